"""Progress of long work (ZO-GraSP, an epoch and the CGE step inside it, evaluation), one facility
for all of it. On a terminal it is a tqdm bar; when the stream is not a terminal (a log file, a
pipe, a batch job) it is one plain line at most every ``interval`` seconds, so logs stay readable;
disabled (``--no-progress``) it prints nothing."""
from __future__ import annotations

import sys
import time


def hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``total`` units of work named ``desc``. ``update(n)`` advances; ``note(text)`` sets the
    status shown after the count (e.g. the state of a long step inside an epoch). A terminal
    redraws at most once a second; a non-terminal stream gets a line
    ``desc: n/total unit (p%), r unit/s, ETA h:mm:ss; text`` at most every ``interval`` seconds
    (never for work that ends sooner). Use as a context manager or call :meth:`close`."""

    REDRAW_S = 1.0

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True, interval: float = 30.0,
                 initial: int = 0, stream=None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.enabled, self.interval = enabled, float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.text = ""
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=False,
                            dynamic_ncols=True, file=self.stream)
        self._n0 = self.n  # units done before this object started: not part of its rate

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Advance by ``n`` (and set the status text to ``note``): one redraw or line for both."""
        self.n += n
        if note is not None:
            self.text = note
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
                self.last = time.perf_counter()
            self.bar.update(n)
        self._maybe_line()

    def due(self) -> bool:
        """Whether a :meth:`note` now would be shown (so a costly status text is only built then)."""
        wait = self.REDRAW_S if self.bar is not None else self.interval
        return self.enabled and time.perf_counter() - self.last >= wait

    def note(self, text: str) -> None:
        self.text = text
        if self.bar is not None and time.perf_counter() - self.last >= self.REDRAW_S:
            self.last = time.perf_counter()
            self.bar.set_postfix_str(text)
        self._maybe_line()

    def line(self) -> str:
        """The plain progress line (what a non-terminal stream gets)."""
        spent = time.perf_counter() - self.t0
        done = self.n - self._n0
        rate = done / spent if spent > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {hms((self.total - self.n) / rate)}" if rate > 0 and self.total else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.3g} {self.unit}/s{eta}"
                + (f"; {self.text}" if self.text else ""))

    def _maybe_line(self) -> None:
        if not self.enabled or self.bar is not None:
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False
