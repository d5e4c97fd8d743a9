"""`ragfleet serve <name>`: run one service in the foreground (same as `python -m services.<name>`)."""

from __future__ import annotations

import argparse
import importlib

SERVICES = ("embedding", "retrieval", "generation", "gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=SERVICES, help="which service to run")


def run(args: argparse.Namespace) -> int:
    # Each service package exposes main() in services/<name>/server.py; configuration comes from RAGFLEET_* env.
    return int(importlib.import_module(f"services.{args.name}.server").main() or 0)
