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
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ragfleet", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    # The top level takes no options but --help, so the first other word names the subcommand.
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:
            _load(module_name, sub)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.error(f"{args.command} is not available in this build")
    return int(args._run(args) or 0)


def _load(module_name: str, sub: argparse.ArgumentParser) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return  # left out of this build: main() says so
    module.add_arguments(sub)
    sub.set_defaults(_run=module.run)


if __name__ == "__main__":
    sys.exit(main())
