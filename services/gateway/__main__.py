"""`python -m services.gateway` runs the gateway service."""

import sys

from services.gateway.server import SERVICE, build
from services.runtime.serve import main

sys.exit(main(SERVICE, build))
