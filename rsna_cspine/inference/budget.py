"""The time budget of a prediction run: which path (full, cheap, prior) each study can still afford."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class PredictionBudget:
    """Chooses each study's path so that the run ends before ``limit_s``.

    Before each study the time left is compared with ``safety ×`` the median time of a study on each
    path times the number of studies left: the full path while it fits for all of them, else the cheap
    path (tried once to measure it; kept while one more study fits), else the prior.

    Attributes:
        limit_s: the wall-clock limit in seconds from ``start``; ``None`` = no limit.
        safety: factor on the estimates.
        start: ``time.monotonic()`` when the run began.
    """

    limit_s: float | None
    safety: float = 1.2
    start: float = field(default_factory=time.monotonic)
    times: dict[str, list[float]] = field(default_factory=lambda: {"full": [], "cheap": []})

    def remaining(self) -> float:
        if self.limit_s is None:
            return float("inf")
        return self.limit_s - (time.monotonic() - self.start)

    def record(self, path: str, seconds: float) -> None:
        """Add one finished study's time on ``path`` to the estimates."""
        if path in self.times:
            self.times[path].append(seconds)

    def estimate(self, path: str) -> float | None:
        """Median seconds per study on ``path`` (``None`` before the first one)."""
        return statistics.median(self.times[path]) if self.times[path] else None

    def choose(self, n_left: int) -> str:
        """Path for the next study.

        Args:
            n_left: studies still to predict, this one included.
        """
        if self.limit_s is None:
            return "full"
        remaining = self.remaining()
        if remaining <= 0:
            return "prior"
        full, cheap = self.estimate("full"), self.estimate("cheap")
        if full is None:
            # Nothing measured yet: the only way to learn the cost is to run one study.
            return "full"
        if full * self.safety * n_left <= remaining:
            return "full"
        # The cheap path is never slower than the full one, so the full estimate bounds it until measured.
        cheap_bound = full if cheap is None else cheap
        if cheap_bound * self.safety <= remaining:
            return "cheap"
        return "prior"
