"""Script executors for the scripting node (reference §4.2).

Every runner speaks the Lambda contract: event ``{script, variables}`` in, ``{result, console,
error}`` out. ``error`` is the script's own failure (the node's user error); a runner that cannot
run the script at all (Lambda throttled, sandbox missing) raises a FluxError instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

PYTHON = "Python"
JAVASCRIPT = "JavaScript"
LANGUAGES = (JAVASCRIPT, PYTHON)


@dataclass(frozen=True)
class ScriptResponse:
    result: Any = None
    console: tuple[str, ...] = field(default_factory=tuple)
    error: str | None = None

    @classmethod
    def from_payload(cls, payload: Any) -> ScriptResponse:
        """Lenient about shapes an executor may send: console as text or lines, error as any value."""
        if not isinstance(payload, dict):
            return cls(result=payload)
        console = payload.get("console") or ()
        lines = console.splitlines() if isinstance(console, str) else [str(line) for line in console]
        error = payload.get("error")
        if error not in (None, "") and not isinstance(error, str):
            error = json.dumps(error, default=str)
        return cls(result=payload.get("result"), console=tuple(lines), error=error or None)


class ScriptRunner(Protocol):
    name: str

    def run(self, language: str, script: str, variables: list[dict[str, Any]]) -> ScriptResponse:
        """Run ``script`` (``language`` is one of LANGUAGES) with ``variables`` [{name, value}]."""
        ...
