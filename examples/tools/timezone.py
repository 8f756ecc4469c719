"""Clock tool of the voice agent: the current time in a named UTC offset zone."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

ZONES = {"utc": 0, "london": 0, "paris": 1, "new york": -5, "san francisco": -8, "tokyo": 9, "sydney": 10}


def current_time(city: str) -> dict:
    """{"city", "time"} (ISO 8601) for a known city; ValueError names the known ones otherwise."""
    offset = ZONES.get(city.strip().lower())
    if offset is None:
        raise ValueError(f"unknown city {city!r}; known: {', '.join(sorted(ZONES))}")
    now = datetime.now(timezone(timedelta(hours=offset)))
    return {"city": city, "time": now.isoformat(timespec="seconds")}
