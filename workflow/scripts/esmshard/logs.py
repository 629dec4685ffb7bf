"""Logging for the workflow's jobs: everything to the job's log file, warnings and errors also
to stderr so that they reach the terminal running snakemake; for ``esmshard embed``, everything
to stderr."""

import faulthandler
import logging
import sys
from pathlib import Path

from esmshard.progress import process_age
from esmshard.stopping import Stopped, TimedOut


class _Raising:
    """A stop signal's exception raised while a record is being written must stop the rank;
    logging's own handleError would print it and carry on."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], (Stopped, TimedOut)):
            raise
        super().handleError(record)


class _FileHandler(_Raising, logging.FileHandler):
    pass


class _StreamHandler(_Raising, logging.StreamHandler):
    pass


def setup(log_path) -> None:
    to_file = _FileHandler(log_path, mode="w")
    to_file.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    to_terminal = _StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter("esmshard: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_terminal], force=True)
    sys.excepthook = _log_uncaught
    # a crash in native code (a segfault, an abort) leaves its Python stacks in the log
    faulthandler.enable(file=to_file.stream, all_threads=True)
    # which code runs: a deployed workflow's own package, never one installed from elsewhere
    logging.getLogger("esmshard").info("esmshard from %s", Path(__file__).resolve().parent)
    # what the job spent before its first line (interpreter, Snakemake's preamble, imports)
    logging.getLogger("esmshard").info("job process started %.3f s ago", process_age())


def setup_terminal() -> None:
    handler = _StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    faulthandler.enable(all_threads=True)


def _log_uncaught(kind, error, trace) -> None:
    """An error no code handled goes to the job's log too (its first line is what a failed run
    names), with its traceback; the terminal gets the traceback once, as without this hook."""
    logging.getLogger("esmshard").error("%s: %s", kind.__name__, error)
    logging.getLogger("esmshard").info("traceback", exc_info=(kind, error, trace))
    sys.__excepthook__(kind, error, trace)
