"""The Dagster instance class of this deployment (dagster.yaml ``instance_class``).

One difference from ``DagsterInstance``: the Python log handlers configured in dagster.yaml
(``python_logs.dagster_handler_config``) are built once per instance, not for every run. Dagster
builds them with ``logging.config.dictConfig``, which closes every handler of the process while
holding logging's module lock; with many runs on the threads of one run host
(``flux_dagster/launcher/run_host.py``) that deadlocks against a run emitting an event (seen:
one thread in ``dictConfig`` waiting for a run's handler, that run waiting for the module lock).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from logging import Handler

from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef


class FluxDagsterInstance(DagsterInstance):
    _yaml_handlers_lock = threading.Lock()

    @classmethod
    def config_schema(cls):
        return {}

    @classmethod
    def config_defaults(cls, base_dir: str):
        return InstanceRef.config_defaults(base_dir)

    def get_yaml_python_handlers(self) -> Sequence[Handler]:
        with self._yaml_handlers_lock:
            if getattr(self, "_flux_yaml_handlers", None) is None:
                self._flux_yaml_handlers = list(super().get_yaml_python_handlers())
            return self._flux_yaml_handlers
