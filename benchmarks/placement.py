"""Where a benchmark runs: on this host's KVM when it has hardware semantics, else inside
kvmkit's nested machine (``kvmkit.nested``), which gives a KVM with hardware semantics on a host
whose KVM is paravirtualized (``kvm_pvm``) or missing."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvmkit import nested
from kvmkit.images import default_guest

#: Memory of the nested machine when a benchmark runs there.
NESTED_MEMORY = "2G"


def command_line(doc: str | None, results: str) -> argparse.ArgumentParser:
    """The command line every benchmark that can run nested shares: ``doc`` as its help, ``--json``
    (default ``benchmarks/results/<results>``) and ``--where``."""
    parsed = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parsed.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / results)
    add_argument(parsed)
    return parsed


def parser(doc: str | None, results: str, quick: str) -> argparse.ArgumentParser:
    """The command line every alternating-rounds benchmark shares: ``command_line``'s, ``--quick``
    (``quick`` says what it cuts) and ``--rounds``."""
    parsed = command_line(doc, results)
    parsed.add_argument("--quick", action="store_true", help=f"{quick} (a smoke run)")
    parsed.add_argument("--rounds", type=int, help="alternating rounds per case")
    return parsed


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--where auto|here|nested`` to a benchmark's command line."""
    parser.add_argument(
        "--where",
        choices=["auto", "here", "nested"],
        default="auto",
        help="here: on this host's KVM; nested: inside kvmkit's nested machine; auto (default): "
        "nested unless this host's KVM has hardware semantics",
    )


def describe() -> str:
    """Which machine this process runs on, for reports."""
    return "the nested machine" if nested.inside() else f"this host ({nested.host_kvm().value} KVM)"


def relaunch(args: argparse.Namespace, script: str, cpus: int = 2, *, linux: bool = False) -> int | None:
    """Runs ``script`` again with the same arguments inside the nested machine, when ``--where``
    asks for it, and copies its report back to ``--json``; returns its exit status, or None when
    the benchmark should run here. ``linux``: the benchmark boots the default guest, which is built
    here first (the nested machine sees the cache read-only, and has no network)."""
    if args.where == "here" or nested.inside():
        return None
    if args.where == "auto" and nested.host_kvm() is nested.HostKvm.HARDWARE:
        return None
    if linux:
        default_guest()
    print(
        f"running in kvmkit's nested machine ({cpus} CPUs, {NESTED_MEMORY}); it takes a while to boot",
        flush=True,
    )
    # The report comes back through a folder of its own. Sharing the report's folder instead could
    # share the machine's /tmp, where a benchmark's Unix sockets would then sit on 9p, which
    # cannot hold them.
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-report-") as shared:
        report = Path(shared) / args.json.name
        argv = [sys.executable, str(Path(script).resolve()), *sys.argv[1:], "--where", "here"]
        argv += ["--json", str(report)]
        status = nested.run(argv, writable=[Path(shared)], cpus=cpus, memory=NESTED_MEMORY)
        if report.exists():
            args.json.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, args.json)
    return status


def run(
    args: argparse.Namespace,
    script: str,
    here: Callable[[argparse.Namespace], int],
    cpus: int = 2,
    *,
    linux: bool = False,
) -> int:
    """Runs the benchmark ``script``: ``here(args)`` on this machine, or ``relaunch``'s run in the
    nested machine; its exit status."""
    status = relaunch(args, script, cpus, linux=linux)
    return here(args) if status is None else status
