"""How a rank stops early: stop signals, its time limit, and durations as users write them.

SIGTERM and SIGINT raise ``Stopped`` and SIGALRM (the rank's ``timeout``) raises ``TimedOut``
in the main thread, wherever the rank is: waiting for a GPU, loading, or embedding. Inside
``signals_deferred()`` (a segment or shard being written) the exception waits until the write is
done, so no file is left half-written. Standard library only: the Snakefile checks durations
while it is parsed.
"""

import contextlib
import re
import signal


class Stopped(Exception):
    """SIGTERM or SIGINT: finished work is on disk and the rank exits non-zero to be retried."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class TimedOut(Exception):
    """The rank ran past its time limit: finished work is on disk, the rank counts as failed."""


_deferred = {"depth": 0, "pending": None}


def _on_signal(signum, frame):
    error = TimedOut("rank ran past its time limit") if signum == signal.SIGALRM else Stopped(signum)
    if _deferred["depth"]:
        _deferred["pending"] = _deferred["pending"] or error  # raised when the write is done
    else:
        raise error


@contextlib.contextmanager
def signals_deferred():
    """A segment or shard write finishes before a stop signal is acted on."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
    if not _deferred["depth"] and _deferred["pending"] is not None:
        error, _deferred["pending"] = _deferred["pending"], None
        raise error


def handle_stop_signals(timeout_seconds: float | None = None) -> None:
    """SIGTERM/SIGINT raise Stopped, and (with a timeout) SIGALRM raises TimedOut, in the main thread."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, _on_signal)
    if timeout_seconds:
        signal.setitimer(signal.ITIMER_REAL, timeout_seconds)


def disarm_timeout() -> None:
    """The work is done: no alarm may end the process now (at exit Python restores SIGALRM's
    default action, which would kill it)."""
    signal.setitimer(signal.ITIMER_REAL, 0)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_WITH_UNITS = re.compile(rf"^(?:(?:{_NUMBER})[smhd])+$")
_CLOCK = re.compile(r"^(?:\d+:){1,2}\d+(?:\.\d*)?$")


def parse_duration(value, option: str = "timeout") -> float | None:
    """Seconds (> 0) from a number or a string such as '90s', '45m', '11h30m', '2d', '1:30:00';
    None for None. Anything else raises ValueError naming ``option`` and the accepted forms."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if isinstance(value, bool) or not text:
        seconds = None
    elif isinstance(value, (int, float)) or re.fullmatch(_NUMBER, text):
        seconds = float(text)
    elif _WITH_UNITS.match(text):
        seconds = sum(float(number) * _UNITS[unit] for number, unit in re.findall(rf"({_NUMBER})([smhd])", text))
    elif _CLOCK.match(text):
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + float(part)
    else:
        seconds = None
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise ValueError(
            f"{option}: {value!r} is not a duration; give seconds (> 0), a number with units such as "
            f"'90m', '12h' or '11h30m', a clock time such as '1:30:00', or null for no limit"
        )
    return seconds
