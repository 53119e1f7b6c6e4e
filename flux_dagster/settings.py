"""Where the worker keeps its local state, and how env vars pick production or embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path


def flux_home() -> Path:
    """The project's local state folder (SQLite app DB, local files, Dagster home)."""
    return Path(os.environ.get("FLUX_HOME") or Path.cwd() / ".flux").resolve()


def database_url() -> str:
    """``FLUX_DATABASE_URL`` selects the app DB; the embedded default is a SQLite file."""
    url = os.environ.get("FLUX_DATABASE_URL")
    if url:
        return url
    home = flux_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'app.db'}"


def env(name: str, default: str | None = None) -> str | None:
    """An env var, with empty strings treated as unset (compose files pass ``VAR=`` around)."""
    value = os.environ.get(name)
    return value if value else default
