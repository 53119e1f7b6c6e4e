"""Display box (``outputController``), reference §4.6: shows its input, and saves it as a file
when ``saveOutput`` is on. The file is rendered here (``useDocRaptor`` has no meaning for this
worker and is ignored)."""

from __future__ import annotations

from typing import Any

from flux_dagster.db.engine import session_scope
from flux_dagster.errors import UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.files.store import FileStore
from flux_dagster.nodes.files import as_text, generate_file, record_generated_file

NODE_TYPE = "outputController"
DEFAULT_FILE_EXTENSION = "txt"


def display_text(data: dict[str, Any]) -> str:
    """Every ``textData`` item joined by newlines when edges fed it, else the static ``text``."""
    items = data.get("textData")
    if isinstance(items, list) and items:
        texts = (item.get("text") if isinstance(item, dict) else item for item in items)
        return "\n".join(as_text(text) for text in texts if text is not None)
    return as_text(data.get("text"))


def run_display_box(database_url: str, store: FileStore, task: NodeTask) -> NodeOutcome:
    """One implementation for ``process_single_node``'s op and the agent runner."""
    data = task.data
    text = display_text(data)
    ref = None
    if data.get("saveOutput"):
        if not text.strip():
            raise UserConfigError("The display box has no text to save as a file.", field="text")
        ref = generate_file(store, task, text=text, file_type=data.get("fileExtension") or DEFAULT_FILE_EXTENSION,
                            custom_file_name=data.get("customFileName"), field="fileExtension")
    updates: dict[str, Any] = {"text": text}
    with session_scope(database_url) as session:
        if ref is not None:
            updates.update(record_generated_file(session, task, ref))
        elif data.get("fileLink"):  # no new file: the earlier run's link stays the node's link
            updates["fileLink"] = data["fileLink"]
        persist_node_success(session, task, data_updates=updates, output=text, output_type="text")
    output: dict[str, Any] = {"text": text}
    if updates.get("fileLink"):
        output["fileLink"] = updates["fileLink"]
    return NodeOutcome(task=task, output=output, message="Node executed successfully",
                       extra={"fileKey": ref.key} if ref else {})
