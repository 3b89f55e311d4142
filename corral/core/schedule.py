"""When a schedule fires next: fixed intervals or cron expressions (UTC), time passed in."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from croniter import CroniterError, croniter

__all__ = ["next_fire", "validate_cron"]


def validate_cron(expr: str) -> None:
    """Raise ValueError naming ``expr`` unless it is a valid cron expression."""
    try:
        croniter(expr)
    except (CroniterError, TypeError, ValueError) as exc:
        raise ValueError(
            f"invalid cron expression {expr!r}: {exc}; expected 5 fields "
            "'minute hour day-of-month month day-of-week', e.g. '*/5 * * * *'"
        ) from exc


def next_fire(
    *, now: float, interval: float | None = None, cron: str | None = None,
    last: float | None = None,
) -> float:
    """The next epoch time the schedule fires; give exactly one of ``interval`` or ``cron``."""
    if (interval is None) == (cron is None):
        raise ValueError("a schedule takes exactly one of interval or cron")
    if cron is not None:
        return _next_cron(cron, now, last)
    if interval is None or not (interval > 0 and math.isfinite(interval)):
        raise ValueError(f"schedule interval must be a positive number of seconds, got {interval!r}")
    # A missed fire (last + interval <= now) is returned as is: the caller fires it now.
    return (now if last is None else last) + interval


def _next_cron(cron: str, now: float, last: float | None) -> float:
    validate_cron(cron)
    # Never fire twice for one slot if the clock stepped back behind the last fire.
    base = now if last is None else max(now, last)
    start = datetime.fromtimestamp(base, tz=UTC)
    try:
        return float(croniter(cron, start).get_next(float))
    except CroniterError as exc:
        raise ValueError(
            f"cron expression {cron!r} never fires after {start.isoformat()}: {exc}"
        ) from exc
