"""The ``kvmkit`` command."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Sequence

import kvmkit
from kvmkit.errors import KvmkitError
from kvmkit.exits import ExitReason


def _demo(args: argparse.Namespace) -> int:
    from kvmkit.demo import run_greeting

    result = run_greeting(args.name)
    sys.stdout.write(result.output)
    print(
        f"[kvmkit] guest stopped: {result.exit.reason.value} after {result.io_exits} port exits "
        f"in {result.seconds * 1e3:.2f} ms"
    )
    return 0 if result.exit.reason is ExitReason.HLT else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmkit", description="KVM virtual machines from Python.")
    parser.add_argument("--version", action="version", version=f"kvmkit {kvmkit.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the bundled greeting guest")
    demo.add_argument("--name", default=_user(), help="the name the host tells the guest")
    demo.set_defaults(func=_demo)
    return parser


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "world"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KvmkitError as error:
        print(f"kvmkit: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
