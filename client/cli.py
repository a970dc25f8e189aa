"""The `chunksync` command: finds its subcommands through the `chunksync.commands` entry points, so the
device side never imports the server package (DESIGN.md) and each package owns its own commands."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunksync", description="Diff pulls for OCI container images.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for entry in sorted(entry_points(group="chunksync.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as exc:
            # e.g. a device install without the server's dependencies: the other commands still work
            print(f"chunksync: commands of {entry.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Each command's `register(subparsers)` adds its parsers with `set_defaults(func=handler)`;
    `handler(args)` returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("chunksync: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
