"""Where the benchmarks leave their results: one JSON file each under benchmarks/results/."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import kvmkit


def write_report(path: Path, **fields: Any) -> None:
    """Writes ``fields`` with the machine, its kernel and kvmkit's version to ``path``."""
    report = {
        "machine": platform.node(),
        "kernel": platform.release(),
        "kvmkit": kvmkit.__version__,
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {path}")
