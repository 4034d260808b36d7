"""Command line: `python -m refany3d {render,generate,eval,...}`, mirroring the Python API.

Each subcommand has an `_add_<name>` function that declares its arguments and a `_run_<name>`
function that calls the library. Errors refany3d raises on purpose become one line on stderr and
exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from refany3d.errors import RefAny3DError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refany3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except RefAny3DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Subcommands register themselves below, one section each.
_SUBCOMMANDS: list = []
