"""Reading what a run wrote."""

from __future__ import annotations

from typing import Any

from traintel.schema import parse_line


def strict_object(line: str | bytes) -> dict[str, Any]:
    """One JSON line parsed strictly (``traintel.schema.parse_line``: no NaN/Infinity literals, no
    duplicate keys), which must be an object."""
    value = parse_line(line)
    assert isinstance(value, dict), line
    return value
