"""``Retry``: how the Engine retries a failed step."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


def _seconds(v: timedelta | float, what: str) -> float:
    s = v.total_seconds() if isinstance(v, timedelta) else float(v)
    if s < 0:
        raise ValueError(f"Retry {what} must not be negative, got {v!r}")
    return s


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failed step up to ``attempts`` times in all, with exponential backoff.

    The n-th failed attempt (1-based) waits ``backoff * multiplier**(n-1)``,
    capped at ``max_backoff``, before the Engine's ``run_due`` tries again.
    After the last attempt the workflow is marked failed; ``Engine.retry(id)``
    re-arms it. Only the Engine applies a policy: plain ``gorch.resume``
    raises ``StepFailed`` on every failure.
    """

    attempts: int = 3
    backoff: timedelta | float = 1.0
    multiplier: float = 2.0
    max_backoff: timedelta | float = 3600.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry attempts must be at least 1, got {self.attempts}")
        if self.multiplier < 1:
            raise ValueError(f"Retry multiplier must be at least 1, got {self.multiplier}")
        _seconds(self.backoff, "backoff")
        _seconds(self.max_backoff, "max_backoff")

    def delay(self, failed_attempts: int) -> timedelta:
        """How long to wait after ``failed_attempts`` failures."""
        base = _seconds(self.backoff, "backoff")
        cap = _seconds(self.max_backoff, "max_backoff")
        n = max(failed_attempts, 1) - 1
        return timedelta(seconds=min(cap, base * self.multiplier**n))

    def exhausted(self, failed_attempts: int) -> bool:
        return failed_attempts >= self.attempts
