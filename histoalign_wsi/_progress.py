"""Progress of long steps: a tqdm bar on an interactive terminal; elsewhere (under
Snakemake, in a batch job) one short line on stderr at most every few seconds, so no step
is silent for long and logs stay small."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Count work done out of ``total``; use as a context manager.

    Lines read ``encode demo_01: 1200/3400 tiles (35%), 41.2 tiles/s``.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "tile",
        every: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = 0
        self._t0 = self._last = time.monotonic()
        interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = tqdm(total=total, unit=unit, desc=desc, file=self.stream) if interactive else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        rate = self.done / max(now - self._t0, 1e-9)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        took = f" in {now - self._t0:.1f} s" if final else ""
        self.stream.write(
            f"{self.desc}: {self.done}/{self.total} {self.unit}s{pct}{took}, {rate:.1f} {self.unit}s/s\n"
        )
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.total:
            self._line(time.monotonic(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
