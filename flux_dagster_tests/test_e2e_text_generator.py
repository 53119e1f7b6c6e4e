"""The text generator's features end to end through one real daemon and code server (SQLite),
shared by the module: version snapshots, web search, images, streaming to a socket through a real
Redis, cancellation settlement (single node and agent), and usage shapes. The providers are the
real SDKs talking to one loopback server that speaks each wire format."""

import json
import time
import uuid

import pytest
import redis
from sqlalchemy import select, update

from flux_dagster import demo, queue
from flux_dagster.db.engine import create_schema, session_scope
from flux_dagster.db.models import FlowVersionHistory, NodeExecution, PendingExecution, SystemAiModel, TokenLedgerEntry, utcnow
from flux_dagster_tests.conftest import add_flow, add_node, enqueue_agent, node_data
from flux_dagster_tests.fakes.llm import FakeLlm
from flux_dagster_tests.test_e2e_daemon import deployment, wait_terminal

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/0"
OPENAI = {"AiSystem": "openai", "aiModel": "gpt-4o-mini"}
ANTHROPIC = {"AiSystem": "anthropicai", "anthropicModel": "claude-4-5-sonnet"}


@pytest.fixture(scope="module")
def llm():
    with FakeLlm() as server:
        yield server


@pytest.fixture(scope="module")
def channels():
    suffix = uuid.uuid4().hex[:8]
    return {"status": f"room_status_updated_test_{suffix}", "stream": f"node_output_stream_test_{suffix}"}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, llm, channels):
    """The app DB and one deployment for the whole module."""
    tmp = tmp_path_factory.mktemp("e2e_text_generator")
    url = f"sqlite:///{tmp / 'app.db'}"
    create_schema(url)
    with session_scope(url) as s:
        demo.seed(s)
        s.add(SystemAiModel(modelName="gpt-4o-vision", aiCompany="openai", maxOutputToken=4096, isVisionModel=True))
    env = {"OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{llm.url}/v1",
           "ANTHROPIC_API_KEY": "sk-ant-e2e", "ANTHROPIC_BASE_URL": llm.url,
           "PPLX_API_KEY": "pplx-e2e", "PERPLEXITY_BASE_URL": f"{llm.url}/perplexity",
           "GROQ_API_KEY": "gsk-e2e", "GROQ_BASE_URL": f"{llm.url}/openai/v1",
           "XAI_API_KEY": "xai-e2e", "XAI_BASE_URL": f"{llm.url}/openai/v1",
           "REDIS_URL": REDIS_URL, "FLUX_STATUS_CHANNEL": channels["status"], "FLUX_STREAM_CHANNEL": channels["stream"],
           "FLUX_OP_DEADLINES": "counter=3"}
    with deployment(tmp, url, env):
        yield url


@pytest.fixture(autouse=True)
def fresh_answer(llm):
    llm.reset()
    llm.requests.clear()


def run_node(url, flow_id, node_id, **fields):
    with session_scope(url) as s:
        row = queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                            user_id="user-1", session_id="s1", **fields)
        return row.id, row.exec_id


def finished(url, *ids):
    rows = wait_terminal(url, list(ids))
    return [rows[i] for i in ids]


def ledger(url, exec_id):
    with session_scope(url) as s:
        return list(s.scalars(select(TokenLedgerEntry).where(TokenLedgerEntry.exec_id == exec_id)))


def node_execution(url, exec_id, node_id):
    with session_scope(url) as s:
        return s.scalar(select(NodeExecution).where(NodeExecution.execId == exec_id, NodeExecution.nodeId == node_id))


def llm_bodies(llm):
    return [r.body for r in llm.requests if isinstance(r.body, dict)]


# 1. version snapshots ------------------------------------------------------------------------------


def test_published_versions_run_instead_of_the_working_copy(app_url, llm):
    """A node execution and an agent execution, each naming a published version."""
    flow_id, node_id = add_node(app_url, "commandTextNode", {**OPENAI, "prompt": "DRAFT prompt"})
    version_id = str(uuid.uuid4())
    math = lambda f: ("mathFunction", {"formula": f, "variables": []})  # noqa: E731
    agent_flow = add_flow(app_url, {"n": math("1"), "w": ("commandTextNode", OPENAI)}, [])  # draft: no edge
    agent_version = str(uuid.uuid4())
    with session_scope(app_url) as s:
        s.add(FlowVersionHistory(id=version_id, flowId=flow_id, version=3, edges=[],
                                 nodes=[{"nodeId": node_id, "type": "commandTextNode",
                                         "data": {**OPENAI, "prompt": "PUBLISHED prompt"}}]))
        s.add(FlowVersionHistory(id=agent_version, flowId=agent_flow, version=1, nodes=[
            {"nodeId": "n", "type": "mathFunction", "data": {"formula": "6 * 7", "variables": []}},
            {"nodeId": "w", "type": "commandTextNode", "data": {**OPENAI, "instruction": "Use the number."}},
        ], edges=[{"id": str(uuid.uuid4()), "edgeId": "e1", "flowId": agent_flow, "source": "n", "target": "w",
                   "sourceHandle": "output", "targetHandle": "prompt"}]))
    ok = run_node(app_url, flow_id, node_id, flow_version_history_id=version_id)
    missing_version = run_node(app_url, flow_id, node_id, flow_version_history_id=str(uuid.uuid4()))
    missing_node = run_node(app_url, flow_id, "not-published", flow_version_history_id=version_id)
    agent = enqueue_agent(app_url, agent_flow, flow_version_history_id=agent_version)
    rows = finished(app_url, ok[0], missing_version[0], missing_node[0], agent[0])
    assert [r.status for r in rows] == ["completed", "failed", "failed", "completed"], rows[3].error
    assert "does not exist" in rows[1].error and "is not in version" in rows[2].error
    systems = sorted(body["messages"][0]["content"] for body in llm_bodies(llm))
    assert len(systems) == 2 and not any("DRAFT" in system for system in systems)
    assert "PUBLISHED prompt" in systems[1]
    assert "# Task\n42" in systems[0]  # the published edge fed the published formula's result
    execution = node_execution(app_url, ok[1], node_id)
    assert execution.flowVersionHistoryId == version_id and execution.output == llm.text
    assert node_data(app_url, node_id)["text"] == llm.text  # outputs go where they always go


# 2. web search -------------------------------------------------------------------------------------


def test_web_search_per_provider_and_a_provider_that_cannot_search(app_url, llm):
    flow_id, openai_node = add_node(app_url, "commandTextNode", {**OPENAI, "prompt": "News?", "webSearch": True})
    _, anthropic_node = add_node(app_url, "commandTextNode", {**ANTHROPIC, "prompt": "News?", "webSearch": True,
                                                              "webSearchMaxUses": 2}, flow_id=flow_id)
    _, pplx_node = add_node(app_url, "commandTextNode", {"AiSystem": "perplexityai", "perplexityType": "sonar",
                                                         "prompt": "News?"}, flow_id=flow_id)
    _, groq_node = add_node(app_url, "commandTextNode", {"AiSystem": "groq", "groqModel": "llama-3.3-70b-versatile",
                                                         "prompt": "News?", "webSearch": True}, flow_id=flow_id)
    runs = [run_node(app_url, flow_id, n) for n in (openai_node, anthropic_node, pplx_node, groq_node)]
    rows = finished(app_url, *(r[0] for r in runs))
    assert [r.status for r in rows] == ["completed", "completed", "completed", "failed"]
    assert "Web search is not available for groq" in rows[3].error
    paths = sorted(r.path for r in llm.requests)
    assert paths == ["/perplexity/chat/completions", "/v1/messages", "/v1/responses"]
    anthropic_body = next(r.body for r in llm.requests if r.path == "/v1/messages")
    assert anthropic_body["tools"] == [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
    urls = [url for url, _ in llm.search_results]
    for node_id in (openai_node, anthropic_node, pplx_node):
        logs = json.loads(node_data(app_url, node_id)["logs"])
        assert [s["url"] for s in logs["sources"]] == urls, node_id
        if node_id != pplx_node:
            assert logs["toolCalls"][0]["toolName"] == "web_search" and logs["toolResults"], node_id


# 3. multimodal -------------------------------------------------------------------------------------


def test_images_of_the_prompt_reach_a_vision_model_and_others_fail_clearly(app_url, llm):
    image = "http://93.184.216.34/photos/cat.png?size=large"
    prompt = f"What is in {image} and http://93.184.216.34/doc.html ?"
    flow_id, vision = add_node(app_url, "commandTextNode", {"AiSystem": "openai", "aiModel": "gpt-4o-vision",
                                                            "prompt": prompt, "multimodalEnabled": True})
    _, blind = add_node(app_url, "commandTextNode", {**OPENAI, "prompt": prompt, "multimodalEnabled": True},
                        flow_id=flow_id)
    _, private = add_node(app_url, "commandTextNode", {"AiSystem": "openai", "aiModel": "gpt-4o-vision",
                                                       "prompt": "See http://127.0.0.1:9/secret.png",
                                                       "multimodalEnabled": True}, flow_id=flow_id)
    runs = [run_node(app_url, flow_id, n) for n in (vision, blind, private)]
    rows = finished(app_url, *(r[0] for r in runs))
    assert [r.status for r in rows] == ["completed", "failed", "failed"]
    assert "cannot read images" in rows[1].error and "non-public address 127.0.0.1" in rows[2].error
    [body] = llm_bodies(llm)
    assert body["messages"][-1]["content"][1] == {"type": "image_url", "image_url": {"url": image}}
    system = body["messages"][0]["content"]
    assert image not in system and "http://93.184.216.34/doc.html" in system  # only images become parts


# 4. streaming --------------------------------------------------------------------------------------


def test_streaming_to_a_socket_through_redis_and_the_same_result_without(app_url, llm, channels):
    llm.text = " ".join(f"word{i}" for i in range(60))
    llm.chunks, llm.chunk_delay_s = 60, 0.02
    flow_id, node_id = add_node(app_url, "commandTextNode", {**OPENAI, "prompt": "Stream please."})
    subscriber = redis.Redis.from_url(REDIS_URL).pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(channels["stream"])
    streamed = run_node(app_url, flow_id, node_id, socket_id="socket-abc")
    plain = run_node(app_url, flow_id, node_id)
    messages = []
    deadline = time.monotonic() + 120
    while not (messages and messages[-1]["payload"]["done"]):
        assert time.monotonic() < deadline, messages[-3:]
        message = subscriber.get_message(timeout=1.0)
        if message:
            messages.append(json.loads(message["data"]))
    subscriber.close()
    rows = finished(app_url, streamed[0], plain[0])
    assert [r.status for r in rows] == ["completed", "completed"]
    assert {m["socketId"] for m in messages} == {"socket-abc"}
    assert {m["room"] for m in messages} == {f"room_user_user-1_flow_{flow_id}"}
    payloads = [m["payload"] for m in messages]
    assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
    assert all(llm.text.startswith(p["text"]) for p in payloads) and 2 <= len(payloads) <= 61
    assert payloads[-1] == {**payloads[-1], "nodeId": node_id, "execId": streamed[1], "text": llm.text, "done": True,
                            "status": "COMPLETED", "tokens": {"input": 11, "output": 7}}
    # the final text, tokens and charge are those of the run without a socket
    a, b = node_execution(app_url, streamed[1], node_id), node_execution(app_url, plain[1], node_id)
    assert a.output == b.output == llm.text and a.metadata_["tokens"] == b.metadata_["tokens"]
    [charge_a], [charge_b] = ledger(app_url, streamed[1]), ledger(app_url, plain[1])
    assert (charge_a.input_tokens, charge_a.output_tokens) == (charge_b.input_tokens, charge_b.output_tokens) == (11, 7)


# 5. cancellation settlement --------------------------------------------------------------------------


def wait_for(predicate, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def cancel(url, pending_id):
    with session_scope(url) as s:
        s.execute(update(PendingExecution).where(PendingExecution.id == pending_id).values(cancel_requested_at=utcnow()))


def slow_answer(llm):
    llm.text = "slow " * 600
    llm.chunks, llm.chunk_delay_s = 600, 0.1  # a minute of streaming


def assert_settled(url, exec_id, node_id, llm):
    data = node_data(url, node_id)
    assert data["executionStatus"] == "CANCELLED" and data["partialOutput"] is True
    assert data["text"] and llm.text.startswith(data["text"]) and len(data["text"]) < len(llm.text)
    execution = node_execution(url, exec_id, node_id)
    assert execution.status == "CANCELLED" and execution.output == data["text"] and execution.cancelledAt
    [charge] = ledger(url, exec_id)  # the tokens used so far, charged once
    assert charge.state == "charged" and charge.estimated and charge.output_tokens >= len(data["text"]) // 4 > 0


def test_cancelling_a_running_text_generator_keeps_and_charges_its_partial_answer(app_url, llm):
    slow_answer(llm)
    flow_id, node_id = add_node(app_url, "commandTextNode", {**OPENAI, "prompt": "Take your time."})
    pending_id, exec_id = run_node(app_url, flow_id, node_id)
    wait_for(lambda: llm.requests)
    time.sleep(1.0)  # some of the answer has arrived
    cancel(app_url, pending_id)
    [row] = finished(app_url, pending_id)
    assert row.status == "cancelled"
    assert_settled(app_url, exec_id, node_id, llm)


def test_cancelling_an_agent_stops_the_text_generator_it_is_running(app_url, llm):
    slow_answer(llm)
    math = ("mathFunction", {"formula": "2", "variables": []})
    writer, after = f"writer-{uuid.uuid4().hex[:6]}", f"after-{uuid.uuid4().hex[:6]}"  # node ids unique in the DB
    flow_id = add_flow(app_url, {writer: ("commandTextNode", {**OPENAI, "prompt": "Take your time."}), after: math},
                       [(writer, after)])
    pending_id, exec_id = enqueue_agent(app_url, flow_id)
    wait_for(lambda: llm.requests)
    time.sleep(1.0)
    started = time.monotonic()
    cancel(app_url, pending_id)
    [row] = finished(app_url, pending_id)
    assert time.monotonic() - started < 30  # not left to stream its minute
    assert row.status == "cancelled", row.error
    assert_settled(app_url, exec_id, writer, llm)
    assert node_execution(app_url, exec_id, after).status == "CANCELLED"


# 7. usage shapes -------------------------------------------------------------------------------------


def test_usage_shapes_are_charged_with_the_right_counts(app_url, llm):
    flow_id, thinking = add_node(app_url, "commandTextNode", {**ANTHROPIC, "prompt": "Think.", "reasoning": True,
                                                              "anthropicToken": 4096})
    llm.reasoning = "Thinking it over."
    llm.usage = {"input_tokens": 9, "cache_read_input_tokens": 100, "output_tokens": 40,
                 "output_tokens_details": {"thinking_tokens": 30}}
    first = run_node(app_url, flow_id, thinking)
    finished(app_url, first[0])
    _, reasoning = add_node(app_url, "commandTextNode", {"AiSystem": "xai", "aiModel": "grok-4", "prompt": "Reason."},
                            flow_id=flow_id)
    # xAI reports reasoning tokens beside the completion (total counts them)
    llm.usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 60,
                 "completion_tokens_details": {"reasoning_tokens": 30}}
    second = run_node(app_url, flow_id, reasoning)
    finished(app_url, second[0])
    _, unreported = add_node(app_url, "commandTextNode", {**OPENAI, "prompt": "No usage."}, flow_id=flow_id)
    llm.usage, llm.reasoning = {}, ""
    third = run_node(app_url, flow_id, unreported)
    finished(app_url, third[0])
    [a] = ledger(app_url, first[1])
    assert (a.input_tokens, a.output_tokens, a.estimated) == (109, 40, False)
    assert json.loads(node_data(app_url, thinking)["logs"])["reasoning"] == "Thinking it over."
    [b] = ledger(app_url, second[1])
    assert (b.input_tokens, b.output_tokens, b.estimated) == (10, 50, False)
    [c] = ledger(app_url, third[1])
    assert c.estimated and c.output_tokens == -(-len(llm.text) // 4)


# 6. timeouts --------------------------------------------------------------------------------------


def test_a_step_past_its_deadline_fails_clearly_instead_of_hanging(app_url):
    flow_id, node_id = add_node(app_url, "counterNode", {"counterMode": "wait", "waitSeconds": 30, "text": "1"})
    pending_id, exec_id = run_node(app_url, flow_id, node_id)
    [row] = finished(app_url, pending_id)
    assert row.status == "failed" and "did not finish within 3 s" in row.error
    assert node_execution(app_url, exec_id, node_id).status == "FAILED"
