"""`ragfleet serve <name>`: run one service in the foreground (same as `python -m services.<name>`)."""

from __future__ import annotations

import argparse
import importlib

SERVICES = ("embedding", "retrieval", "generation", "gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=SERVICES, help="which service to run")


def run(args: argparse.Namespace) -> int:
    # Each services/<name>/server.py declares SERVICE and build(config); configuration comes from RAGFLEET_* env.
    from services.runtime.serve import main  # the gRPC stack loads only for a service

    server = importlib.import_module(f"services.{args.name}.server")
    return main(server.SERVICE, server.build)
