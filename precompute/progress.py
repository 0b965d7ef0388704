"""Progress of long steps: a tqdm bar on a terminal, plain log lines everywhere else.

Every long step of a run reports through ``bar(...)`` (something counted: iterations, Hessian
columns, examples, retrained models) or ``step(...)`` (a named step of the pipeline). On a terminal
(stderr is a TTY) ``bar`` draws a tqdm bar on stderr. Otherwise (a file, a pipe, CI) one heartbeat
thread prints the innermost active item as one plain line on stdout every ``interval`` seconds,
whether or not it advanced, so a log never goes quiet for longer than that (stderr stays for the
one-line error of a failed run):

    [  42.0s] validation > retraining: 96/171 model-stages (56%), pretraining: chunk 1/1, iteration 7,
              largest ‖∇‖ 3.1e-06 | 21.3s, ETA 16s

``PRECOMPUTE_PROGRESS_INTERVAL`` sets the interval (default 5 s); ``PRECOMPUTE_PROGRESS=plain``
forces log lines (``tty`` forces bars, ``off`` silences both).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import TextIO

DEFAULT_INTERVAL = 5.0


def _interval() -> float:
    try:
        return max(0.05, float(os.environ.get("PRECOMPUTE_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _mode(stream: TextIO) -> str:
    forced = os.environ.get("PRECOMPUTE_PROGRESS", "").lower()
    if forced in ("plain", "tty", "off"):
        return forced
    try:
        return "tty" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


def _default_stream() -> TextIO:
    """stderr for bars on a terminal; stdout for plain lines, so stderr holds only errors."""
    return sys.stderr if _mode(sys.stderr) == "tty" else sys.stdout


def format_seconds(s: float) -> str:
    """3.2s, 42s, 3m05s, 1h02m."""
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class _Item:
    """One active step or counter on the stack of what is running now."""

    def __init__(self, desc: str, total: float | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0.0
        self.fraction: float | None = None     # overrides n / total for the ETA when set
        self.note = ""
        self.start = time.perf_counter()

    def eta(self) -> float | None:
        """Seconds left at the average rate so far (None before the first unit is done)."""
        frac = self.fraction if self.fraction is not None else (self.n / self.total if self.total else None)
        if not frac or frac <= 0:
            return None
        elapsed = time.perf_counter() - self.start
        return max(0.0, elapsed * (1 - min(frac, 1.0)) / frac)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        count = ""
        if self.total:
            count = f": {self.n:.0f}/{self.total:.0f} {self.unit} ({self.n / self.total:.0%})"
        elif self.n:
            count = f": {self.n:.0f} {self.unit}" + (f" (~{self.fraction:.0%})" if self.fraction else "")
        note = f", {self.note}" if self.note else ""
        if not count and not note:
            count = ": running"
        eta = self.eta()
        return f"{self.desc}{count}{note} | {format_seconds(elapsed)}" + (
            f", ETA {format_seconds(eta)}" if eta is not None else "")


class _Reporter:
    """The stack of active items and the heartbeat thread that prints it (plain mode)."""

    def __init__(self):
        self.stack: list[_Item] = []
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.thread: threading.Thread | None = None
        self.stream: TextIO = sys.stderr
        self.wake = threading.Event()
        self.sleeping_for = 0.0

    def push(self, item: _Item, stream: TextIO) -> None:
        with self.lock:
            self.stack.append(item)
            self.stream = stream
            if _interval() < self.sleeping_for:   # the interval was shortened: do not finish the long wait
                self.wake.set()
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="precompute-progress", daemon=True)
                self.thread.start()

    def pop(self, item: _Item) -> None:
        with self.lock:
            if item in self.stack:
                self.stack.remove(item)

    def emit(self, text: str) -> None:
        stamp = time.perf_counter() - self.t0
        try:
            self.stream.write(f"[{stamp:7.1f}s] {text}\n")
            self.stream.flush()
        except (ValueError, OSError):      # stream closed under us: progress is best effort
            pass

    def current(self) -> str:
        with self.lock:
            if not self.stack:
                return ""
            outer = [i.desc for i in self.stack[:-1]]
            return " > ".join(outer + [self.stack[-1].line()])

    def _beat(self) -> None:
        """Lives as long as the process (a daemon); prints only while something is active."""
        while True:
            self.sleeping_for = _interval()
            if self.wake.wait(self.sleeping_for):
                self.wake.clear()
                continue
            text = self.current()
            if text:
                self.emit(text)


_REPORTER = _Reporter()


class Bar:
    """A counter with a total, an ETA and a free-text note (e.g. the current gradient norm).

    The tqdm-like subset the project uses: ``update(n)``, ``set_note(text)``, ``close()``, and use
    as a context manager. Disabled bars do nothing.
    """

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None):
        self.stream = stream or _default_stream()
        self.mode = _mode(self.stream) if enabled else "off"
        self.item = _Item(desc, total, unit)
        self._tqdm = None
        if self.mode == "tty":
            from tqdm.auto import tqdm
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5, file=self.stream)
        elif self.mode == "plain":
            _REPORTER.push(self.item, self.stream)
            _REPORTER.emit(_REPORTER.current().rsplit(" | ", 1)[0] + " started")

    @property
    def n(self) -> float:
        return self.item.n

    def update(self, n: float = 1) -> None:
        self.item.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)

    def set_fraction(self, fraction: float) -> None:
        """Estimated fraction done when the count alone does not say (e.g. an iteration cap that
        convergence usually beats); used for the ETA."""
        self.item.fraction = fraction

    def set_note(self, text: str) -> None:
        self.item.note = text
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)

    def close(self, summary: str = "") -> None:
        """Ends the bar; ``summary`` (e.g. the final gradient norm) joins the count on the "done" line."""
        if self._tqdm is not None:
            if summary:
                self._tqdm.set_postfix_str(summary, refresh=True)
            self._tqdm.close()
            self._tqdm = None
        elif self.mode == "plain" and self.item in _REPORTER.stack:
            done = f"{self.item.desc}: done in {format_seconds(time.perf_counter() - self.item.start)}"
            details = ([f"{self.item.n:.0f} {self.item.unit}"] if self.item.n else []) + ([summary] if summary else [])
            if details:
                done += f" ({', '.join(details)})"
            _REPORTER.emit(done)
            _REPORTER.pop(self.item)
        self.mode = "off"

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(desc: str, total: float | None = None, unit: str = "it", enabled: bool = True) -> Bar:
    """A progress counter (see ``Bar``)."""
    return Bar(desc, total, unit, enabled)


@contextmanager
def step(name: str, enabled: bool = True, stream: TextIO | None = None):
    """A named step of the pipeline: one line when it starts and ends (plain mode), heartbeat lines
    in between, and the step's name in front of any counter inside it."""
    stream = stream or _default_stream()
    mode = _mode(stream) if enabled else "off"
    if mode == "off":
        yield
        return
    item = _Item(name, None, "")
    if mode == "tty":
        stream.write(f"· {name}\n")
        stream.flush()
        yield
        return
    _REPORTER.push(item, stream)
    _REPORTER.emit(f"{name}: started")
    try:
        yield
    finally:
        _REPORTER.emit(f"{name}: done in {format_seconds(time.perf_counter() - item.start)}")
        _REPORTER.pop(item)


__all__ = ["Bar", "DEFAULT_INTERVAL", "bar", "format_seconds", "step"]
