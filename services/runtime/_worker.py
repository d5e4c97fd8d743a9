"""One worker of a multi-worker service (services.runtime.workers): ``python -m services.runtime._worker
<server module> <index> <report fd>``, started by the supervisor, never by hand. It builds the service, then waits
until every worker has built before it listens (``build_when_all_built``)."""

import importlib
import sys

from services.runtime.serve import main
from services.runtime.workers import WorkerLink, build_when_all_built

module, index, fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
server = importlib.import_module(module)
link = WorkerLink(index, fd)
sys.exit(main(server.SERVICE, build_when_all_built(server.build, link), worker=link))
