"""The ``twfix`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import twfix


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twfix", description="TIME-WAIT and address-reuse diagnostics.")
    parser.add_argument("--version", action="version", version=f"twfix {twfix.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0
