"""Every node type this worker runs: the branch (op) that runs it in ``process_single_node``, and
the same stages called in a row for ``process_agent``. A type missing here fails with a clear
"not supported by this worker" error (large memory, integrations, …: see the README's table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flux_dagster.db.engine import session_scope
from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.llm.providers import LlmClient
from flux_dagster.nodes import (
    api_caller, counter, display_box, files, image_generator, math_function, scripting, sql_querier,
)
from flux_dagster.nodes import audio_transcriber, mcp_client
from flux_dagster.nodes import text_generator as tg
from flux_dagster.services.main_api import MainApi
from flux_dagster.services.media_apis import MediaApis
from flux_dagster.services.notifications import Notifier


@dataclass(frozen=True)
class NodeServices:
    """The clients one node needs, built from the run's resources."""

    database_url: str
    main_api: MainApi
    llm: LlmClient
    notifier: Notifier
    file_store: Any
    script_runner: Any
    dagster_run_id: str
    media: MediaApis = field(default_factory=MediaApis)

    def sessions(self):
        return session_scope(self.database_url)


def _text_generator(s: NodeServices, task: NodeTask) -> NodeOutcome:
    tg.validate_access(s.main_api, task)
    generation = tg.generate(s.database_url, s.llm, task, generation_id=f"{s.dagster_run_id}/{task.node_id}",
                             main_api=s.main_api, notifier=s.notifier)
    return files.save_output_file(s.database_url, s.file_store, tg.charge(s.main_api, task, generation))


def _image_generator(s: NodeServices, task: NodeTask) -> NodeOutcome:
    return image_generator.run_image_generator(
        s.sessions, task, llm=s.llm, store=s.file_store, main_api=s.main_api,
        generation_id=f"{s.dagster_run_id}/{task.node_id}", media=s.media,
    )


def _mcp_client(s: NodeServices, task: NodeTask) -> NodeOutcome:
    return mcp_client.run_mcp_client(s.sessions, task, llm=s.llm, main_api=s.main_api,
                                     generation_id=f"{s.dagster_run_id}/{task.node_id}")


@dataclass(frozen=True)
class NodeType:
    branch: str
    run: Callable[[NodeServices, NodeTask], NodeOutcome]


NODE_TYPES: dict[str, NodeType] = {
    "commandTextNode": NodeType("text_generator", _text_generator),
    "scripting": NodeType("scripting", lambda s, t: scripting.run_scripting(s.database_url, s.script_runner, t)),
    "apiCaller": NodeType("api_caller", lambda s, t: api_caller.run_api_caller(s.sessions, t)),
    "mathFunction": NodeType("math_function", lambda s, t: math_function.run_math_function(s.sessions, t)),
    "counterNode": NodeType("counter", lambda s, t: counter.run_counter(s.sessions, t)),
    "sqlQuerier": NodeType("sql_querier", lambda s, t: sql_querier.run_sql_querier(s.sessions, t)),
    "imageGenerator": NodeType("image_generator", _image_generator),
    "outputController": NodeType("display_box", lambda s, t: display_box.run_display_box(s.database_url, s.file_store, t)),
    audio_transcriber.NODE_TYPE: NodeType(
        "audio_transcriber", lambda s, t: audio_transcriber.run_audio_transcriber(s.sessions, t, llm=s.llm, media=s.media)),
    mcp_client.NODE_TYPE: NodeType("mcp_client", _mcp_client),
}

