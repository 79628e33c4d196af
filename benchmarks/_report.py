"""What every benchmark script reports the same way: the device, the exact command line that produced the
numbers, and where the JSON goes (--out, else $OUT on a lent device machine, else benchmarks/results/)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(extra: str = "") -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores{extra})"


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/<script> <args>` as it was run (argv None: this process's own arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python benchmarks/{script}" + (" " + shlex.join(args) if args else "")


def results_path(out: str | None, name: str, committed_name: str) -> Path:
    """--out when given; else $OUT/<name>.json (the device machine hands $OUT back); else the committed
    benchmarks/results/<committed_name>.json. Its folder is created."""
    path = Path(out) if out else Path(os.environ["OUT"]) / f"{name}.json" if os.environ.get("OUT") else RESULTS / f"{committed_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_result(result: dict, out: str | None, name: str, committed_name: str) -> Path:
    """The result as JSON at `results_path(...)`; says where."""
    import json

    path = results_path(out, name, committed_name)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path
