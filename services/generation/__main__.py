"""`python -m services.generation` runs the generation service."""

import sys

from services.generation.server import SERVICE, build
from services.runtime.serve import main

sys.exit(main(SERVICE, build))
