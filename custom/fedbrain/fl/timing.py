"""Time spent by filters in a site's own process (e.g. HE decryption), handed to the site loop,
which reports it with the round's metrics."""

from __future__ import annotations

_exchange_seconds: dict[str, float] = {}


def record_exchange_time(name: str, seconds: float) -> None:
    _exchange_seconds[name] = _exchange_seconds.get(name, 0.0) + float(seconds)


def collect_exchange_times() -> dict[str, float]:
    out = dict(_exchange_seconds)
    _exchange_seconds.clear()
    return out


