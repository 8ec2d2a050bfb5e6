"""Rolling per-session figures for /metrics: rates over the last seconds, latency percentiles."""
from __future__ import annotations

import time
from collections import deque

import numpy as np


class Rate:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self.times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        self.times.append(time.monotonic() if now is None else now)
        self._trim(self.times[-1])

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return len(self.times) / self.window_s

    def _trim(self, now: float) -> None:
        while self.times and self.times[0] < now - self.window_s:
            self.times.popleft()


class Samples:
    """The last N values of a latency; p50/p95 on demand."""

    def __init__(self, n: int = 300):
        self.values: deque[float] = deque(maxlen=n)

    def add(self, v: float) -> None:
        self.values.append(float(v))

    def summary(self) -> dict | None:
        if not self.values:
            return None
        a = np.fromiter(self.values, float)
        return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
                "max": round(float(a.max()), 2), "n": len(a)}


class StageTimes:
    """Samples per named stage (the tracker's timing_ms keys, render, engine)."""

    def __init__(self, n: int = 300):
        self.n = n
        self.stages: dict[str, Samples] = {}

    def add(self, timings: dict[str, float]) -> None:
        for k, v in timings.items():
            self.stages.setdefault(k, Samples(self.n)).add(v)

    def summary(self) -> dict:
        return {k: s.summary() for k, s in sorted(self.stages.items())}
