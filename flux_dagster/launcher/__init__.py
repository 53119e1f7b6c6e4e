"""A run launcher that starts runs from a warm, pre-imported process (see ``launcher.py``)."""

from flux_dagster.launcher.launcher import WarmRunLauncher

__all__ = ["WarmRunLauncher"]
