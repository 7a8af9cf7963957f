"""`toma-export`: one module per command, each with `add_parser(sub)` and `run(args)`. Commands import
their heavy modules when they run, so `--help` stays fast.

Errors the toolkit raises on purpose (ToMAExportError) print as one line and exit 2; anything else is a
bug and keeps its traceback."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ToMAExportError
from . import bench, build, demo, export, export_repo, generate, request, serve, sweep, validate

COMMANDS = (demo, export, build, validate, generate, sweep, bench, export_repo, serve, request)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toma-export", description="ToMA token merging for diffusers FLUX.1 and "
                                     "SDXL: patch, export to ONNX, build TensorRT engines, validate, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is patched and built")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(func=command.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except ToMAExportError as err:
        print(f"toma-export: error: {err}", file=sys.stderr)
        return 2
