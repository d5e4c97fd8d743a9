"""One worker of a multi-worker service (services.runtime.workers): ``python -m services.runtime._worker
<server module> <index> <report fd>``, started by the supervisor, never by hand."""

import importlib
import sys

from services.runtime.serve import main
from services.runtime.workers import WorkerLink

module, index, fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
server = importlib.import_module(module)
sys.exit(main(server.SERVICE, server.build, worker=WorkerLink(index, fd)))
