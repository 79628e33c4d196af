"""What a person sees on the console: the project's progress and results, warnings and errors.

Ray's and faiss's own bookkeeping (Ray Data's progress dumps, Ray Train's "Reporting training result" lines,
its placement-group cleaner's State API warnings, faiss's loader trying AVX builds) is left out of the console
and stays in Ray's log files (`<Ray session>/logs`: worker-*.out/err, ray-data.log, ...). `--verbose`, or
KDCI_VERBOSE=1 in the environment (it works through `ray job submit` too), shows everything again and prints
every epoch instead of about ten lines per run.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

VERBOSE_ENV = "KDCI_VERBOSE"
VERBOSE_HELP = ("Ray's and faiss's own log lines and every epoch on the console too (or KDCI_VERBOSE=1); by default they "
                "are only in Ray's log files")

# Lines of Ray's and faiss's internals, as Ray forwards them from its workers (raw text: no logger name or level
# survives the trip) or as their loggers write them in this process.
INTERNAL_LINES = re.compile("|".join([
    r"Loading faiss", r"Could not load library with AVX", r"No module named 'faiss\.swigfaiss", r"Successfully loaded faiss",
    r"Reporting training result \d+: TrainingReport",
    r"Failed to query Ray Train Controller actor state",  # no dashboard, so no State API: the cleaner retries, harmless
    r"has constructor arguments in the object store and max_restarts",
    r"PYTHON worker processes have been started on node",  # Tune's trial processes on a small machine
    r"Token authentication is enabled for this Ray cluster",
    r"Execution plan of Dataset|execution finished in|Starting execution of Dataset|logging_progress|Running Dataset:",
]))

# Loggers whose INFO lines are internals; their warnings and errors still show (those matching INTERNAL_LINES excepted).
_INTERNAL_LOGGERS = ("ray", "faiss")
# Loggers of this process whose INFO lines nobody needs anywhere ("Creating initial MLflow database tables...").
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(verbose: bool) -> None:
    """Record the choice in the environment: a local Ray started after this inherits it in every worker."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


class _InternalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_INTERNAL_LOGGERS) and record.levelno < logging.WARNING:
            return False
        try:
            return not INTERNAL_LINES.search(record.getMessage())
        except Exception:  # a record that cannot format: logging reports it as usual when the handler formats it
            return True


_FILTER = _InternalFilter()


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Logging for an entry point (`kdci-ray ...`, `jobs/*.py`): our INFO lines with the time, on stderr."""
    verbose = verbose or is_verbose()
    set_verbose(verbose)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    if not verbose:  # set before the libraries make these loggers: MLflow's store set-up lines, one per new store
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    quiet_console_handlers()


def quiet_console_handlers() -> None:
    """Put the filter on every handler that writes to the console: the root's and those libraries bring
    (Ray's, Ray Data's: its file handler keeps everything in ray-data.log). Idempotent; called after the imports
    that add handlers (`import ray`, `ray.data`, `ray.tune`)."""
    if is_verbose():
        return
    loggers = [logging.getLogger()] + [logger for logger in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


# Ray Train's own actors: all they print is Ray's bookkeeping (the cleaner's State API retries; where two Ray
# instances share a machine, its monitor thread's traceback on finding both).
INTERNAL_ACTORS = ("PlacementGroupCleaner",)


def _filtered(print_lines):
    def print_filtered(data: dict, *args, **kwargs) -> None:
        if data.get("actor_name") in INTERNAL_ACTORS:
            return
        lines = [line for line in data.get("lines", []) if not INTERNAL_LINES.search(line)]
        if lines:
            print_lines({**data, "lines": lines}, *args, **kwargs)

    print_filtered._kdci_filtered = True
    return print_filtered


def filter_forwarded_lines(ray) -> bool:
    """Drop INTERNAL_LINES from what Ray prints on this driver of its workers' output and of the raylet's
    messages (they stay in the workers' and raylet's log files). Ray has no public hook for this: its two
    printing paths are wrapped; a Ray without them prints everything, as before. Returns whether the filter is in place."""
    if is_verbose():
        return False
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        handler = dict(dispatcher.handlers).get("ray_print_logs")  # the workers' lines (log_to_driver)
        if not getattr(ray_worker.print_to_stdstream, "_kdci_filtered", False):  # the raylet's messages call it directly
            ray_worker.print_to_stdstream = _filtered(ray_worker.print_to_stdstream)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    if handler is not None and not getattr(handler, "_kdci_filtered", False):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _filtered(handler))
    return True


def ray_log_folder(ray) -> str | None:
    try:  # no public accessor for the session folder of the Ray this driver is connected to
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:
        return None


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Stages:
    """One line per stage of a long job on stderr (`[2/7    15s] generation: ...`), with the elapsed time, and an
    indented line when it is done."""

    def __init__(self, stages: int):
        self.stages, self.stage, self.t0 = stages, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.stage += 1
        print(f"[{self.stage}/{self.stages} {time.perf_counter() - self.t0:6.0f}s] {message}", file=sys.stderr, flush=True)

    def done(self, message: str) -> None:
        print(f"        {message}", file=sys.stderr, flush=True)


class Progress:
    """Elapsed time and an estimate of what is left for `total` units of work (epochs, synthesis calls, trial
    epochs), and which units get a console line: the first, the last and about `lines` in all (every one when
    verbose). `start`: units already done before this process (a resumed run), left out of the rate."""

    def __init__(self, total: int, start: int = 0, lines: int = 10):
        self.total, self.start, self.t0 = max(1, total), start, time.perf_counter()
        self.every = 1 if is_verbose() else max(1, round((total - start) / max(1, lines)))

    def due(self, done: int) -> bool:
        return done in (self.start + 1, self.total) or (done - self.start) % self.every == 0

    def eta(self, done: int) -> str:
        elapsed = time.perf_counter() - self.t0
        ran = done - self.start
        if ran <= 0 or done >= self.total:
            return duration(elapsed)
        return f"{duration(elapsed)}, ~{duration(elapsed / ran * (self.total - done))} left"
