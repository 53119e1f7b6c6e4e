"""Counter (``counterNode``), reference §4.5: count up or down from ``text``, or wait."""

from __future__ import annotations

import math
from typing import Any

from flux_dagster import interrupts
from flux_dagster.errors import UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.nodes.fields import Sessions
from flux_dagster.nodes.math_function import as_number

NODE_TYPE = "counterNode"
MAX_EDGE_WAIT_S = 60.0  # an edge-fed wait is capped; the static one is the user's own choice


def mode_of(data: dict[str, Any]) -> str:
    mode = str(data.get("counterMode") or "").strip().lower()
    if mode in ("up", "down", "wait"):
        return mode
    if mode:
        raise UserConfigError(f"Unknown counter mode {mode!r} (expected up, down or wait).", field="counterMode")
    return "down" if data.get("isIncreasing") is False else "up"  # legacy field, default up


def _number(text: Any) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        return 0.0  # an empty or non-numeric counter starts from 0
    return value if math.isfinite(value) else 0.0


def wait_seconds(data: dict[str, Any]) -> float:
    items = data.get("waitSecondsData")
    from_edge = isinstance(items, list) and bool(items)
    raw = (items[0].get("text") if isinstance(items[0], dict) else items[0]) if from_edge else data.get("waitSeconds")
    try:
        seconds = float(str(raw).strip()) if raw not in (None, "") else 0.0
    except ValueError as exc:
        raise UserConfigError(f"The wait time {raw!r} is not a number of seconds.", field="waitSeconds") from exc
    seconds = max(seconds, 0.0)
    return min(seconds, MAX_EDGE_WAIT_S) if from_edge else seconds


def next_text(data: dict[str, Any]) -> str:
    """The counter's new ``text`` (``wait`` keeps it as it is)."""
    mode = mode_of(data)
    if mode == "wait":
        return "" if data.get("text") is None else str(data.get("text"))
    value = _number(data.get("text")) + (1 if mode == "up" else -1)
    return str(as_number(value))


def run_counter(sessions: Sessions, task: NodeTask, *, sleep=interrupts.sleep) -> NodeOutcome:
    if mode_of(task.data) == "wait":
        sleep(wait_seconds(task.data))
    text = next_text(task.data)
    with sessions() as session:
        persist_node_success(session, task, data_updates={"text": text}, output=text, output_type="text")
    return NodeOutcome(task=task, output={"text": text}, message="Node executed successfully")
