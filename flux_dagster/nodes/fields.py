"""Reading node ``data`` fields the way the original worker does (reference §4, conventions):
a static field ``X`` and an edge-fed array ``XData`` of ``{id?, text, label?}``, the edge value
winning when the array is non-empty."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.orm import Session

# How node functions open an app-DB transaction (``AppDatabase.session`` fits), so they need no Dagster.
Sessions = Callable[[], AbstractContextManager[Session]]


def as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def edge_value(data: dict[str, Any], field: str) -> Any:
    """``XData[0].text`` when the edge array has an item, else the static ``X``."""
    items = data.get(f"{field}Data")
    if isinstance(items, list) and items:
        first = items[0]
        return first.get("text") if isinstance(first, dict) else first
    return data.get(field)


def edge_texts(data: dict[str, Any], field: str) -> list[str]:
    """Every non-empty text of ``XData``, then the static ``X`` (for prompts that join them)."""
    items = data.get(f"{field}Data")
    texts = [as_text(i.get("text") if isinstance(i, dict) else i) for i in items] if isinstance(items, list) else []
    texts.append(as_text(data.get(field)))
    return [t.strip() for t in texts if t and t.strip()]
