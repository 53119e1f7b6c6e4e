"""Demo data for the embedded defaults: models, flows and nodes a newcomer can run at once."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from flux_dagster import queue
from flux_dagster.db.models import Flow, FlowEdge, FlowNode, PendingExecution, SystemAiModel

DEMO_USER = "demo-user"
DEMO_FLOW = "00000000-0000-4000-8000-000000000001"
DEMO_AGENT_FLOW = "00000000-0000-4000-8000-000000000002"

MODELS = [
    dict(modelName="gpt-4o-mini", aiCompany="openai", maxOutputToken=16384),
    dict(modelName="o4-mini", aiCompany="openai", maxOutputToken=100000, supportsReasoning=True),
    dict(modelName="claude-4-5-sonnet", aiCompany="anthropic", maxOutputToken=64000, supportsReasoning=True),
    dict(modelName="llama-3.3-70b-versatile", aiCompany="groq", maxOutputToken=32768),
    dict(modelName="grok-4", aiCompany="xai", maxOutputToken=32768),
    dict(modelName="sonar", aiCompany="perplexity", maxOutputToken=8000),
    dict(modelName="gemini-2.5-flash", aiCompany="gemini", maxOutputToken=65536),
    dict(modelName="gpt-3.5-turbo", aiCompany="openai", maxOutputToken=4096, active=False),
]

NODES = [
    ("summarize", "commandTextNode", {
        "label": "Summarize (OpenAI)", "AiSystem": "openai", "aiModel": "gpt-4o-mini",
        "persona": "You are a concise technical writer.",
        "instruction": "Answer in three sentences.",
        "prompt": "Explain what a workflow execution worker does.",
        "aiTemperature": 0.3, "autoToken": True,
    }),
    ("chat", "commandTextNode", {
        "label": "Chat with memory (Anthropic)", "AiSystem": "anthropicai", "anthropicModel": "claude-4-5-sonnet",
        "prompt": "Remember my favourite colour is teal.", "memory": True, "selectedType": "Load Last X Entries",
        "selectedIndex": 10,
    }),
    ("retired-model", "commandTextNode", {
        "label": "Retired model (fails on purpose)", "AiSystem": "openai", "aiModel": "gpt-3.5-turbo",
        "prompt": "This model is inactive, so this execution shows the error path.",
    }),
]


# An agent: a number feeds a writer, whose text fans out to a display box and a second writer.
AGENT_NODES = [
    ("price", "mathFunction", {"label": "Price with tax", "formula": "price * (1 + tax)",
                               "variables": [{"id": "1", "name": "price", "value": 120},
                                             {"id": "2", "name": "tax", "value": 0.2}]}),
    ("pitch", "commandTextNode", {"label": "Write a pitch", "AiSystem": "openai", "aiModel": "gpt-4o-mini",
                                  "instruction": "Write one sentence selling a product at the given price."}),
    ("tagline", "commandTextNode", {"label": "Tagline", "AiSystem": "anthropicai", "anthropicModel": "claude-4-5-sonnet",
                                    "instruction": "Turn the pitch into a five-word tagline."}),
    ("show", "outputController", {"label": "Show the pitch", "saveOutput": True, "fileExtension": "md",
                                  "customFileName": "pitch"}),
]
AGENT_EDGES = [("price", "pitch", "output", "prompt"), ("pitch", "show", "output", "text"),
               ("pitch", "tagline", "output", "prompt")]


def seed(session: Session) -> None:
    """Idempotent: re-running it leaves one copy of everything."""
    known = set(session.scalars(select(SystemAiModel.modelName)))
    session.add_all(SystemAiModel(**m) for m in MODELS if m["modelName"] not in known)
    if session.get(Flow, DEMO_FLOW) is None:
        session.add(Flow(id=DEMO_FLOW, name="Demo flow", userId=DEMO_USER))
    existing = set(session.scalars(select(FlowNode.nodeId).where(FlowNode.flowId == DEMO_FLOW)))
    session.add_all(
        FlowNode(flowId=DEMO_FLOW, nodeId=node_id, type=node_type, data=data)
        for node_id, node_type, data in NODES if node_id not in existing
    )
    if session.get(Flow, DEMO_AGENT_FLOW) is None:
        session.add(Flow(id=DEMO_AGENT_FLOW, name="Demo agent", userId=DEMO_USER))
        session.add_all(FlowNode(flowId=DEMO_AGENT_FLOW, nodeId=node_id, type=node_type, data=data)
                        for node_id, node_type, data in AGENT_NODES)
        session.add_all(FlowEdge(flowId=DEMO_AGENT_FLOW, edgeId=f"demo-edge-{i}", source=source, target=target,
                                 sourceHandle=source_handle, targetHandle=target_handle)
                        for i, (source, target, source_handle, target_handle) in enumerate(AGENT_EDGES))


def enqueue_demo_executions(session: Session) -> list[PendingExecution]:
    nodes = [
        queue.enqueue(session, kind="node", exec_id=str(uuid.uuid4()), flow_id=DEMO_FLOW, node_id=node_id,
                      user_id=DEMO_USER, session_id="demo-session")
        for node_id, _, _ in NODES
    ]
    exec_id = str(uuid.uuid4())
    agent = queue.enqueue(session, kind="agent", exec_id=exec_id, flow_id=DEMO_AGENT_FLOW, user_id=DEMO_USER,
                          session_id="demo-session", run_id=f"demo-run-{exec_id[:8]}")
    return [*nodes, agent]
