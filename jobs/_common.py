"""What every job shares: the repo on the import path (for `ray job submit --working-dir .`), logging, the
config with its overrides, user errors as one line and exit code 2, and a JSON result line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import kdci_ray` from the working dir
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import faiss  # noqa: E402,F401  (before torch: their OpenMP runtimes otherwise clash)


def parser(description: str) -> argparse.ArgumentParser:
    from kdci_ray.console import VERBOSE_HELP

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="distill config YAML (configs/<method>-<dataset>-<teacher>-<student>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, as `ray job submit` sets it, else a local Ray)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def run(main) -> None:
    """Call `main()` -> dict; print it as one JSON line; input errors print one line and exit 2."""
    from kdci_ray.cli import USER_ERRORS, print_result
    from kdci_ray.console import setup_logging

    setup_logging(verbose="--verbose" in sys.argv[1:])  # before main() parses: its first lines already need it
    try:
        result = main()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print_result(result)
