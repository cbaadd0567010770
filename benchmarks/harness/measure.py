"""Wall-clock and peak-memory measurement of one arm, next to its accuracy."""

from __future__ import annotations

import os
import threading
import time


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ResourceMeter:
    """Samples the process's resident memory every ``interval`` seconds while the ``with`` block runs.

    ``ru_maxrss`` would be the process-wide peak since start, which leaks between arms of one sweep; a
    sampler gives the peak *during* this arm. Without /proc it records wall-clock only.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_rss = 0
        self.start_rss = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> ResourceMeter:
        self._t0 = time.perf_counter()
        if os.path.exists(f"/proc/{os.getpid()}/statm"):
            self.start_rss = self.peak_rss = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak_rss = max(self.peak_rss, _rss_bytes())
        self.seconds = time.perf_counter() - self._t0

    def as_dict(self) -> dict:
        return {
            "wall_seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "start_rss_mb": round(self.start_rss / 2**20, 1),
        }
