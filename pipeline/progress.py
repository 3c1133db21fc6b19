"""Progress a person can read: a bar with an ETA per long task on a terminal (tqdm), a few plain lines elsewhere.

Training runs are followed from what they write to storage (their metrics rows), so the driver shows the same
progress for local runs and for runs on a cluster, and the workers need not print their metrics at all.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from tqdm import tqdm

log = logging.getLogger("sketchgan.progress")


def interactive() -> bool:
    """Whether stdout is a terminal (bars redraw in place) rather than a file or a pipe (plain lines)."""
    return sys.stdout.isatty()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One task's progress towards ``total``: a tqdm bar on a terminal; elsewhere a plain line at each quarter."""

    def __init__(self, desc: str, total: int, unit: str = "it", position: int | None = None, initial: int = 0):
        self.desc, self.total, self.n = desc, max(int(total), 1), int(initial)
        self._quarter = 4 * self.n // self.total
        self.bar = (tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, position=position,
                         dynamic_ncols=True, leave=True) if interactive() else None)

    def update_to(self, n: int, postfix: str = "", rate: float | None = None) -> None:
        """Move to ``n`` done; ``rate`` (units per second) gives the ETA of the plain lines."""
        n = min(int(n), self.total)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n - self.bar.n)
        else:
            quarter = 4 * n // self.total
            if quarter > self._quarter:
                self._quarter = quarter
                eta = f", ETA {_duration((self.total - n) / rate)}" if rate and n < self.total else ""
                print(f"  {self.desc}: {n}/{self.total} ({100 * n // self.total}%{eta}) {postfix}".rstrip(),
                      flush=True)
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Poller:
    """Calls ``poll()`` every ``every`` seconds in a background thread, and once more when the block ends."""

    def __init__(self, poll: Callable[[], None], every: float = 2.0):
        self.poll, self.every = poll, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._safe_poll()

    def _safe_poll(self) -> None:
        try:
            self.poll()
        except Exception as exc:  # noqa: BLE001 - progress display must never fail the work it shows
            log.debug("progress poll failed: %s", exc)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._safe_poll()
