import sys

from services.generation.server import main

sys.exit(main())
