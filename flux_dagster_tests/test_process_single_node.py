"""``process_single_node`` for the text generator, in-process, with the real openai/anthropic SDKs
against loopback servers and a loopback main API, on SQLite and Postgres."""

import json
import threading

import pytest

from flux_dagster.db.models import (
    ExecutionLog, FlowNode, NodeExecution, PendingExecution, StatusNotification, TokenLedgerEntry,
)
from flux_dagster.ops.retries import RETRY_POLICIES
from flux_dagster_tests.conftest import add_node, assert_failed, execute_node, make_resources, rows

OPENAI_NODE = {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "persona": "Be brief.", "prompt": "Say hi.",
               "aiTemperature": 0.5, "label": "Greeter"}


def statuses(url, exec_id):
    return [n.payload["nodes"] for n in rows(url, StatusNotification, exec_id=exec_id)]


def llm_calls(server):
    return [r for r in server.requests if r.path.endswith(("/chat/completions", "/messages"))]


def test_openai_success_through_the_main_api(app_db_url, fake_llm, fake_main_api):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", {**OPENAI_NODE, "nodeUsedTokens": 5,
                                                                 "previewResponses": ["a", "b", "c"]})
    resources = make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api)
    run = execute_node(app_db_url, resources, flow_id, node_id)
    assert run.result.success

    [call] = llm_calls(fake_llm)
    assert call.headers["authorization"] == "Bearer sk-test"
    assert call.body["messages"][0] == {"role": "system", "content": "# Persona\nBe brief.\n\n# Task\nSay hi."}
    assert call.body["temperature"] == 0.5

    [validate] = fake_main_api.calls("/worker/validate-model-access")
    assert validate.body == {"flowId": flow_id, "model": "gpt-4o-mini", "aiSystem": "openai"}
    [charge] = fake_main_api.calls("/worker/charge-tokens")
    assert (charge.body["inputTokens"], charge.body["outputTokens"], charge.body["execId"]) == (11, 7, run.exec_id)
    assert charge.headers["idempotency-key"] == charge.body["idempotencyKey"]

    [node] = rows(app_db_url, FlowNode, nodeId=node_id)
    assert node.data["text"] == fake_llm.text
    assert node.data["executionStatus"] == "COMPLETED"
    assert node.data["nodeUsedTokens"] == 5 + 11 + 7
    assert node.data["previewResponses"] == ["b", "c", fake_llm.text]
    assert json.loads(node.data["logs"])["finishReason"] == "stop"
    [execution] = rows(app_db_url, NodeExecution, execId=run.exec_id)
    assert (execution.status, execution.isError, execution.output, execution.outputType) == (
        "COMPLETED", False, fake_llm.text, "text")
    [log] = rows(app_db_url, ExecutionLog, nodeId=node_id)
    assert (log.isError, log.message) == (False, "Node executed successfully")
    assert rows(app_db_url, PendingExecution, id=run.pending_id)[0].status == "completed"
    assert statuses(app_db_url, run.exec_id) == [{node_id: {"status": "PENDING"}}, {node_id: {"status": "COMPLETED"}}]
    assert [e.state for e in rows(app_db_url, TokenLedgerEntry, exec_id=run.exec_id)] == ["charged"]


def test_anthropic_with_session_memory(app_db_url, fake_llm):
    data = {"AiSystem": "anthropicai", "anthropicModel": "claude-4-5-sonnet", "prompt": "And now?", "memory": True,
            "anthropicToken": 300, "anthropicTopK": 4,
            "userSessionsChat": [{"sessionId": "session-1", "memories": [
                {"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]}]}
    flow_id, node_id = add_node(app_db_url, "commandTextNode", data)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url), flow_id, node_id)
    assert run.result.success
    [call] = llm_calls(fake_llm)
    assert call.path == "/v1/messages"
    assert call.body["model"] == "claude-sonnet-4-5-20250929"
    assert call.body["system"] == "# Task\nAnd now?"
    assert call.body["messages"][:2] == [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    assert (call.body["max_tokens"], call.body["top_k"]) == (300, 4)
    [node] = rows(app_db_url, FlowNode, nodeId=node_id)
    memories = node.data["userSessionsChat"][0]["memories"]
    assert [(m["role"], m["content"]) for m in memories[2:]] == [("user", "And now?"), ("assistant", fake_llm.text)]


def test_openai_compatible_provider_uses_its_own_base_url(app_db_url, fake_llm):
    flow_id, node_id = add_node(app_db_url, "commandTextNode",
                                {"AiSystem": "groq", "groqModel": "llama-3.3-70b-versatile", "prompt": "x", "seed": 3})
    assert execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url), flow_id, node_id).result.success
    [call] = llm_calls(fake_llm)
    assert call.path == "/openai/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer gsk-test"
    assert call.body["seed"] == 3


def test_rate_limit_is_retried_by_dagster_and_charged_once(app_db_url, fake_llm, fake_main_api):
    fake_llm.failures = [429, 500]
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api), flow_id, node_id)
    assert run.result.success
    assert len(llm_calls(fake_llm)) == 3
    assert len(fake_main_api.calls("/worker/charge-tokens")) == 1


def test_provider_bad_request_is_not_retried(app_db_url, fake_llm, fake_main_api):
    fake_llm.failures = [400]
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api), flow_id, node_id)
    assert_failed(app_db_url, run, node_id, "HTTP 400")
    assert len(llm_calls(fake_llm)) == 1
    assert fake_main_api.calls("/worker/charge-tokens") == []
    [execution] = rows(app_db_url, NodeExecution, execId=run.exec_id)
    assert (execution.isError, execution.outputType, execution.status) == (True, "error", "FAILED")
    assert rows(app_db_url, FlowNode, nodeId=node_id)[0].data["executionStatus"] == "FAILED"


def test_persistent_server_errors_exhaust_the_retries_then_fail_once(app_db_url, fake_llm):
    attempts = RETRY_POLICIES["text_generator"].max_retries + 1
    fake_llm.failures = [503] * attempts
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url), flow_id, node_id)
    assert_failed(app_db_url, run, node_id, "HTTP 503")
    assert len(llm_calls(fake_llm)) == attempts


def test_no_model_access_is_a_user_error_before_any_generation(app_db_url, fake_llm, fake_main_api):
    fake_main_api.denied_models.add("gpt-4o-mini")
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api), flow_id, node_id)
    assert_failed(app_db_url, run, node_id, "No access to gpt-4o-mini")
    assert len(fake_main_api.calls("/worker/validate-model-access")) == 1
    assert llm_calls(fake_llm) == []


def test_wrong_internal_key_is_not_mistaken_for_access(app_db_url, fake_llm, fake_main_api):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    resources = make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api)
    fake_main_api.api_key = "another-key"  # the worker still sends test-internal-key
    assert not execute_node(app_db_url, resources, flow_id, node_id).result.success
    assert llm_calls(fake_llm) == []


def test_charge_retries_keep_one_idempotency_key(app_db_url, fake_llm, fake_main_api):
    fake_main_api.charge_failures = [500, 502]
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api), flow_id, node_id)
    assert run.result.success
    keys = {c.body["idempotencyKey"] for c in fake_main_api.calls("/worker/charge-tokens")}
    assert len(fake_main_api.calls("/worker/charge-tokens")) == 3 and len(keys) == 1
    assert len(fake_main_api.charges) == 1
    assert len(llm_calls(fake_llm)) == 1


@pytest.mark.parametrize("node_type,data,message", [
    ("weatherNode", {}, "Node type 'weatherNode' is not supported"),
    ("commandTextNode", "{not json", "malformed data"),
    ("commandTextNode", ["a", "list"], "malformed data"),
    ("commandTextNode", {"AiSystem": "openai", "aiModel": "gpt-3.5-turbo"}, "not available"),
    ("commandTextNode", {"AiSystem": "openai", "aiModel": "no-such-model"}, "not available"),
    ("commandTextNode", {"AiSystem": "skynet", "aiModel": "x"}, "Unknown or missing AI provider"),
])
def test_bad_nodes_fail_alone_with_a_clear_message(app_db_url, node_type, data, message):
    flow_id, node_id = add_node(app_db_url, node_type, data)
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    assert_failed(app_db_url, run, node_id, message)


def test_missing_node_fails_with_a_clear_message(app_db_url):
    flow_id, _ = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, "ghost-node")
    assert not run.result.success
    [row] = rows(app_db_url, PendingExecution, id=run.pending_id)
    assert row.status == "failed" and "ghost-node was not found" in row.error


def test_offline_provider_says_what_it_is(app_db_url):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    assert execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id).result.success
    text = rows(app_db_url, FlowNode, nodeId=node_id)[0].data["text"]
    assert text.startswith("[offline LLM provider")


def test_notifications_reach_a_real_redis_subscriber(app_db_url):
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("room_status_updated")
    received, done = [], threading.Event()

    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)

    def listen():
        for message in pubsub.listen():
            payload = json.loads(message["data"])
            if node_id in payload["payload"]["nodes"]:  # other test runs may share this Redis
                received.append(payload)
            if len(received) == 2:
                done.set()
                return

    threading.Thread(target=listen, daemon=True).start()
    run = execute_node(app_db_url, make_resources(app_db_url, redis_url="redis://127.0.0.1:6379/0"), flow_id, node_id,
                       user_id="u-9")
    assert run.result.success
    assert done.wait(10)
    pubsub.close()
    assert [m["payload"]["nodes"][node_id]["status"] for m in received] == ["PENDING", "COMPLETED"]
    assert received[0]["room"] == f"room_user_u-9_flow_{flow_id}"
    assert received[1]["payload"] | {"nodes": None} == {
        "userId": "u-9", "flowId": flow_id, "nodes": None, "execId": run.exec_id,
        "flowVersionHistoryId": None, "runId": ""}
    assert rows(app_db_url, StatusNotification, exec_id=run.exec_id) == []
