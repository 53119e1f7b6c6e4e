"""Scripting (``scripting``), reference §4.2: run the node's Python or JavaScript in a runner and
keep its ``result`` and ``console`` on the node."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy.orm import Session

from flux_dagster.db.engine import session_scope
from flux_dagster.errors import UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, merge_node_data, persist_node_success
from flux_dagster.scripting import LANGUAGES, ScriptResponse, ScriptRunner

NODE_TYPE = "scripting"
MAX_ERROR_CHARS = 4000


def check_language(data: dict[str, Any]) -> str:
    language = data.get("language")
    if language not in LANGUAGES:
        raise UserConfigError(f"Unsupported script language {language!r}: use JavaScript or Python.", field="language")
    return language


def build_script(data: dict[str, Any]) -> str:
    """The non-empty ``scriptData[].text`` rows joined by newlines, else ``script``."""
    rows = data.get("scriptData")
    texts = [row.get("text") if isinstance(row, dict) else row for row in rows] if isinstance(rows, list) else []
    script = "\n".join(text for text in texts if isinstance(text, str) and text)
    if not script and isinstance(data.get("script"), str):
        script = data["script"]
    if not script.strip():
        raise UserConfigError("The script is empty.", field="script")
    return script


def script_variables(data: dict[str, Any]) -> list[dict[str, Any]]:
    """``variables`` as [{name, value}], rows without a name dropped."""
    raw = data.get("variables") or []
    if not isinstance(raw, list):
        raise UserConfigError("variables must be a list of {name, value}.", field="variables")
    return [
        {"name": row["name"].strip(), "value": row.get("value")}
        for row in raw
        if isinstance(row, dict) and isinstance(row.get("name"), str) and row["name"].strip()
    ]


def substitute_variables(script: str, variables: list[dict[str, Any]]) -> str:
    """``{{name}}`` → the value (text as is, anything else as JSON), in one pass so a value that
    itself contains ``{{other}}`` stays as written. Unknown names stay too."""
    values = {v["name"]: v["value"] if isinstance(v["value"], str) else json.dumps(v["value"]) for v in variables}
    if not values:
        return script
    pattern = re.compile("|".join(re.escape("{{" + name + "}}") for name in values))
    return pattern.sub(lambda match: values[match.group(0)[2:-2]], script)


def console_text(response: ScriptResponse) -> str:
    return "\n".join(response.console)


def persist_script_result(
    session: Session, task: NodeTask, language: str, response: ScriptResponse, runner_name: str
) -> None:
    console = console_text(response)
    result = response.result
    persist_node_success(
        session, task, data_updates={"result": result, "console": console},
        output=result if isinstance(result, str) else json.dumps(result),
        output_type="text" if isinstance(result, str) else "json",
        metadata={"console": console, "language": language, "runner": runner_name},
    )


def run_scripting(database_url: str, runner: ScriptRunner, task: NodeTask) -> NodeOutcome:
    """The scripting activity, for any job: run, then record; the script's failure is a user error
    (never retried), with the console it printed kept on the node."""
    language = check_language(task.data)
    variables = script_variables(task.data)
    script = substitute_variables(build_script(task.data), variables)
    response = runner.run(language, script, variables)  # no DB transaction held while it runs
    with session_scope(database_url) as session:
        if response.error is None:
            persist_script_result(session, task, language, response, runner.name)
        else:
            merge_node_data(session, task, {"console": console_text(response)})
    if response.error is not None:
        raise UserConfigError(f"Script error: {response.error[-MAX_ERROR_CHARS:]}", dev_message=response.error,
                              field="script")
    return NodeOutcome(
        task=task, output={"result": response.result, "console": console_text(response)},
        message="Node executed successfully", extra={"runner": runner.name, "language": language},
    )
