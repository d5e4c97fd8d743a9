"""`python -m services.retrieval` runs the retrieval service."""

import sys

from services.retrieval.server import SERVICE, build
from services.runtime.serve import main

sys.exit(main(SERVICE, build))
