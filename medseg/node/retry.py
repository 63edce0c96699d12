"""The send retry schedule: exponential backoff with a cap, as SMTP queues and Orthanc's job engine retry."""

from __future__ import annotations

#: Longest wait between two attempts, whatever the attempt number.
MAX_BACKOFF_S = 3600.0


def backoff_seconds(attempts: int, base_seconds: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: ``base × 2^(attempts − 1)``, at most
    :data:`MAX_BACKOFF_S` (base 30 s: 30 s, 1 min, 2 min, 4 min, …).

    >>> [backoff_seconds(n, 30.0) for n in (1, 2, 3)]
    [30.0, 60.0, 120.0]
    """
    return min(MAX_BACKOFF_S, base_seconds * 2.0 ** max(0, attempts - 1))
