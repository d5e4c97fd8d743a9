"""The `ragfleet` command: serve one service, run the whole mesh locally, ingest, ask, or run the simulated LLM.

Each subcommand lives in its own module and is imported only when used, so `ragfleet ask` never loads a model.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "serve": ("services.cli.serve", "run one service in the foreground"),
    "up": ("services.cli.up", "start the whole mesh locally as separate processes"),
    "ingest": ("services.cli.ingest", "ingest .txt/.md files or a BEIR corpus.jsonl through the gateway"),
    "ask": ("services.cli.ask", "ask a question and stream the answer"),
    "demo": ("services.cli.demo", "start the mesh, ingest the sample corpus, answer one question, stop"),
    "sim-llm": ("services.cli.sim_llm", "run a simulated OpenAI-compatible LLM/embeddings server"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ragfleet", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.error(f"{args.command} is not available in this build")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
