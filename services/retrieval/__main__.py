import sys

from services.retrieval.server import main

sys.exit(main())
