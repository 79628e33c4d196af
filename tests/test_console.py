"""The console filter and progress lines (kdci_ray.console): which lines are Ray's and faiss's internals, what
reaches the console through logging and through Ray's forwarding of worker output, and the progress cadence."""

import logging

import pytest

from kdci_ray import console

# Lines the README's first command printed before the filter (2026-12-01), as Ray forwarded or logged them.
INTERNAL = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "Reporting training result 3: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/x), metrics={'epoch': 3.0}) from rank 0",
    "✔️  Dataset dataset_0357_0 execution finished in 18.91 seconds",
    "ModuleNotFoundError(\"No module named 'faiss.swigfaiss_avx2'\")",
    "Loading faiss with AVX512 support.",
    "Could not load library with AVX2 support due to:",
    "Successfully loaded faiss.",
    "WARNING: 8 PYTHON worker processes have been started on node: b71b with address: 192.0.2.2, which is 4x the maximum",
]
OURS = [
    "epoch 3/20 loss 1.2592 test 18.67%, agreement with the teacher on held-out data 78.12%  1773 img/s  [1m10s, ~3m left]",
    "distill quickstart-deepinv-kd: digits_cnn -> digits_cnn_small, KDCI off, substitution data pool pool (rows 0..128)",
    "shift at epoch 1: KL(classes || uniform) 0.067, Frechet distance to test features 2.53 (0.1 s)",
    "Traceback (most recent call last):",
    "ValueError: kdci.n = 100000 prototypes but the substitution source has only 256 images",
]


def internal_lines(console: list[str]) -> list[str]:
    """The console lines that are Ray's or faiss's internals: the patterns issue 19 counted and the rest of
    INTERNAL_LINES. Not counted: the one line the driver's C++ core writes straight to its stderr for each Ray Data
    run (core_worker.cc, "constructor arguments in the object store"): no Python hook reaches it (README)."""
    from kdci_ray.console import INTERNAL_LINES

    named = ("PlacementGroupCleaner", "Reporting training result", "execution finished", "swigfaiss", "Loading faiss",
             "Checkpoint successfully created", "Starting execution of Dataset", "Trial status:", "View detailed results")
    return [line for line in console if (INTERNAL_LINES.search(line) or any(n in line for n in named)) and "core_worker.cc" not in line]


def test_internal_lines_are_recognised_and_ours_are_not():
    assert all(console.INTERNAL_LINES.search(line) for line in INTERNAL)
    assert not any(console.INTERNAL_LINES.search(line) for line in OURS)


def test_forwarded_worker_output_keeps_our_lines_only():
    printed = []
    forward = console._filtered(lambda data, **kw: printed.append((data, kw)))
    forward({"lines": INTERNAL[:2] + OURS[:1], "pid": 7, "is_err": True}, ignore_prefix=False)
    forward({"lines": INTERNAL[2:], "pid": 8, "is_err": False}, ignore_prefix=False)  # nothing left: nothing printed
    forward({"lines": ["Traceback (most recent call last):"], "pid": 9, "actor_name": "PlacementGroupCleaner", "is_err": True})
    assert printed == [({"lines": OURS[:1], "pid": 7, "is_err": True}, {"ignore_prefix": False})]


@pytest.mark.parametrize("name, level, shown", [
    ("ray.data._internal.execution.streaming_executor", logging.INFO, False),
    ("ray.tune", logging.WARNING, True),  # Ray's warnings and errors still show
    ("faiss.loader", logging.INFO, False),
    ("kdci_ray.engine.distill", logging.INFO, True),
    ("ray._private.authentication", logging.WARNING, False),  # ... except those in INTERNAL_LINES
])
def test_log_records_of_ray_and_faiss_internals_are_filtered(name, level, shown):
    message = "Token authentication is enabled for this Ray cluster." if name.endswith("authentication") else "a message"
    record = logging.LogRecord(name, level, __file__, 1, message, (), None)
    assert console._FILTER.filter(record) is shown


def test_progress_lines_about_ten_per_run_with_what_is_left(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    p = console.Progress(30)
    due = [e for e in range(1, 31) if p.due(e)]
    assert due[0] == 1 and due[-1] == 30 and 9 <= len(due) <= 12
    resumed = console.Progress(30, start=20)  # a resumed run: its own epochs, first and last shown
    assert [e for e in range(21, 31) if resumed.due(e)][0] == 21 and resumed.due(30)
    assert "left" in p.eta(10) and "left" not in p.eta(30)
    assert console.duration(59) == "59s" and console.duration(61) == "1m01s" and console.duration(7300) == "2h01m"
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert all(console.Progress(30).due(e) for e in range(1, 31))  # --verbose: every epoch
