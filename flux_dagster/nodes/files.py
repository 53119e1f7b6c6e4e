"""A node's generated file (reference §3.6, §3.11 ``/worker/generate-file``): used by the text
generator when ``saveOutput`` and ``fileType`` are set, and by the display box.

The key is derived from the execution, ``generated/<flowId>/<nodeId>/<execId>/<name>.<ext>``: a
retried or re-executed step overwrites its file, its ``generated_files`` row and its
``data.fileLinks`` entry instead of adding new ones, while each new execution keeps its own file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import FlowNode, GeneratedFile, NodeExecution
from flux_dagster.execution import NodeOutcome, NodeTask, merge_node_data
from flux_dagster.files.render import key_segment, normalize_file_type, render, safe_name
from flux_dagster.files.store import FileStore

KEY_ROOT = "generated"


@dataclass(frozen=True)
class GeneratedFileRef:
    key: str
    name: str  # ``<name>.<ext>``, what the user sees and downloads
    file_type: str
    src: str

    @property
    def link(self) -> dict[str, str]:
        """``data.fileLink`` as the main API writes it."""
        return {"src": self.src, "name": self.name}


def as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def storage_key(task: NodeTask, file_name: str) -> str:
    request = task.request
    parts = (key_segment(part) for part in (request.flow_id, task.node_id, request.exec_id))
    return "/".join((KEY_ROOT, *parts, file_name))


def generate_file(store: FileStore, task: NodeTask, *, text: str, file_type: Any,
                  custom_file_name: Any = None, field: str = "fileType") -> GeneratedFileRef:
    """Render ``text`` and store it. No DB transaction is open while the bytes travel."""
    file_type = normalize_file_type(file_type, field)
    name = safe_name(custom_file_name, file_type) or key_segment(task.node_id)
    file_name = f"{name}.{file_type}"
    rendered = render(text, file_type, title=name)
    stored = store.save(storage_key(task, file_name), rendered.content,
                        content_type=rendered.content_type, download_name=file_name)
    return GeneratedFileRef(key=stored.key, name=file_name, file_type=file_type, src=stored.src)


def _same_object(link: Any, src: str) -> bool:
    # Presigned links differ on every signing; without the query they name the object.
    return isinstance(link, dict) and str(link.get("src", "")).split("?", 1)[0] == src.split("?", 1)[0]


def record_generated_file(session: Session, task: NodeTask, ref: GeneratedFileRef) -> dict[str, Any]:
    """Upsert the key's ``generated_files`` row; return the node-data updates that show the link
    (``fileLink``, and ``fileLinks`` with this file's entry replaced or appended)."""
    request = task.request
    row = session.scalar(select(GeneratedFile).where(GeneratedFile.storageKey == ref.key))
    if row is None:
        row = GeneratedFile(storageKey=ref.key)
        session.add(row)
    row.userId, row.flowId, row.nodeId, row.execId = request.user_id, request.flow_id, task.node_id, request.exec_id
    row.name, row.fileType, row.src = ref.name, ref.file_type, ref.src

    node = session.scalar(
        select(FlowNode).where(FlowNode.flowId == request.flow_id, FlowNode.nodeId == task.node_id).with_for_update()
    )
    current = node.data.get("fileLinks") if node is not None and isinstance(node.data, dict) else None
    links = list(current) if isinstance(current, list) else []
    index = next((i for i, link in enumerate(links) if _same_object(link, ref.src)), None)
    if index is None:
        links.append(ref.link)
    else:
        links[index] = ref.link
    return {"fileLink": ref.link, "fileLinks": links}


def save_output_file(database_url: str, store: FileStore, outcome: NodeOutcome) -> NodeOutcome:
    """The text generator's last step: its output as a file when ``saveOutput`` and ``fileType``
    are set, else the outcome unchanged."""
    task = outcome.task
    if not (task.data.get("saveOutput") and task.data.get("fileType")):
        return outcome
    ref = generate_file(store, task, text=as_text(outcome.output), file_type=task.data["fileType"],
                        custom_file_name=task.data.get("customFileName"))
    with session_scope(database_url) as session:
        updates = record_generated_file(session, task, ref)
        merge_node_data(session, task, updates)
        # The front merges the execution's outputData into the node: the link must be there too.
        execution = session.scalar(
            select(NodeExecution).where(NodeExecution.execId == task.request.exec_id,
                                        NodeExecution.nodeId == task.node_id)
        )
        if execution is not None:
            execution.outputData = {**(execution.outputData or {}), **updates}
    return replace(outcome, extra={**outcome.extra, "fileKey": ref.key})
