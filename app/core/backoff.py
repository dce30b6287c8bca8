"""Reconnect delays: exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads
many agents that lost the same relay over the whole interval, so they do not
return in waves; see "Exponential Backoff And Jitter", AWS Architecture Blog,
2015.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for successive failed attempts; ``reset`` after a lasting success."""

    def __init__(self, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.failures)
        self.failures = min(self.failures + 1, 62)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0
