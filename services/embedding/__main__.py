"""`python -m services.embedding` runs the embedding service."""

import sys

from services.embedding.server import SERVICE, build
from services.runtime.serve import main

sys.exit(main(SERVICE, build))
