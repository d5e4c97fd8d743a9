"""`python -m services.embedding` runs the embedding service."""

import sys

from services.embedding.server import main

sys.exit(main())
