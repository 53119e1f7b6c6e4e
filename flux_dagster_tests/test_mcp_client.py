"""MCP client (``mcpNode``) against a real MCP server on loopback built with the same SDK
(FastMCP over streamable HTTP and over SSE), the model's tool choice from a loopback LLM through
the openai and anthropic SDKs, charges through a loopback main API."""

import pytest

from flux_dagster.llm.tool_choice import ToolChoice, ToolSpec, check_arguments, offline_choice
from flux_dagster.nodes import mcp_client as mc
from flux_dagster.resources import LlmResource
from flux_dagster_tests.conftest import (
    add_flow, add_node, assert_failed, execute_agent, execute_node, execution, make_resources, node_data,
)
from flux_dagster_tests.fakes.mcp_server import McpServer
from flux_dagster_tests.fakes.tool_llm import FakeToolLlm

TOKEN = "mcp-secret"


@pytest.fixture
def tool_llm():
    with FakeToolLlm() as server:
        yield server


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(mc.ALLOWED_HOSTS_ENV, "127.0.0.1/32")


def _llm(server) -> LlmResource:
    return LlmResource(offline=False, openai_api_key="sk-mcp", openai_base_url=f"{server.url}/v1",
                       anthropic_api_key="sk-ant-mcp", anthropic_base_url=server.url, timeout_s=10)


def run_node(url, data, **resource_kw):
    flow_id, node_id = add_node(url, mc.NODE_TYPE, data)
    return execute_node(url, make_resources(url, **resource_kw), flow_id, node_id), node_id


def node(server, **extra):
    return {"prompt": "Add two and three.", "serverUrl": server.url, "authToken": TOKEN, **extra}


def test_streamable_http_tool_chosen_by_the_model_called_and_charged_once(app_db_url, tool_llm, fake_main_api,
                                                                          allow_loopback):
    tool_llm.planned = [("add", {"a": 2, "b": 3})]
    fake_main_api.charge_failures = [502]  # the charge step is retried; the tool is not called again
    with McpServer("streamable-http", token=TOKEN) as server:
        run, node_id = run_node(app_db_url, node(server, AiSystem="openai", aiModel="gpt-4o-mini"),
                                llm=_llm(tool_llm), main_api=fake_main_api)
    assert run.result.success
    assert server.calls == [("add", {"a": 2, "b": 3})]
    assert set(server.authorizations) == {f"Bearer {TOKEN}"}
    [choice] = tool_llm.tool_requests()
    assert choice.body["tool_choice"] == "required"
    assert [t["function"]["name"] for t in choice.body["tools"]] == ["add", "shout", "lorem", "explode"]
    assert choice.body["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    data = node_data(app_db_url, node_id)
    assert (data["text"], data["toolCalls"], data["executionStatus"]) == ("5", [{"name": "add", "arguments": {"a": 2, "b": 3}}], "COMPLETED")
    assert execution(app_db_url, run.exec_id).metadata_["transport"] == "streamable-http"
    assert len(fake_main_api.calls("/worker/validate-model-access")) == 1
    charges = fake_main_api.calls("/worker/charge-tokens")
    assert len(charges) == 2 and len({c.body["idempotencyKey"] for c in charges}) == 1
    [charged] = fake_main_api.charges.values()
    assert (charged["inputTokens"], charged["outputTokens"], charged["model"]) == (11, 7, "gpt-4o-mini")


def test_sse_fallback_with_anthropic_and_a_selected_tool(sqlite_app_db_url, tool_llm, allow_loopback):
    tool_llm.planned = [("shout", {"text": "hello there"})]
    with McpServer("sse", token=TOKEN) as server:
        run, node_id = run_node(sqlite_app_db_url, node(server, AiSystem="anthropicai", anthropicModel="claude-4-5-sonnet",
                                                 toolName="shout"), llm=_llm(tool_llm))
    assert run.result.success
    [choice] = tool_llm.tool_requests()
    assert choice.path == "/v1/messages" and choice.body["tool_choice"] == {"type": "tool", "name": "shout"}
    assert [t["name"] for t in choice.body["tools"]] == ["shout"]
    assert node_data(sqlite_app_db_url, node_id)["text"] == "HELLO THERE"
    assert execution(sqlite_app_db_url, run.exec_id).metadata_["transport"] == "sse"


def test_failed_tool_call_is_charged_once_and_not_repeated(sqlite_app_db_url, tool_llm, fake_main_api, allow_loopback):
    tool_llm.planned = [("explode", {"reason": "on purpose"})]
    with McpServer(token=TOKEN) as server:
        run, node_id = run_node(sqlite_app_db_url, node(server), llm=_llm(tool_llm), main_api=fake_main_api)
    assert_failed(sqlite_app_db_url, run, node_id, "The MCP tool 'explode' reported an error")
    assert server.calls == [("explode", {"reason": "on purpose"})]
    assert len(fake_main_api.charges) == 1 and len(fake_main_api.calls("/worker/charge-tokens")) == 1


def test_arguments_outside_the_schema_never_reach_the_tool_but_are_charged(sqlite_app_db_url, tool_llm, fake_main_api,
                                                                           allow_loopback):
    tool_llm.planned = [("add", {"a": "two"})]
    with McpServer(token=TOKEN) as server:
        run, node_id = run_node(sqlite_app_db_url, node(server), llm=_llm(tool_llm), main_api=fake_main_api)
    assert_failed(sqlite_app_db_url, run, node_id, "The model's arguments for the tool 'add' do not fit its schema")
    assert server.calls == []
    assert len(fake_main_api.charges) == 1


def test_result_is_capped(sqlite_app_db_url, tool_llm, allow_loopback, monkeypatch):
    monkeypatch.setenv(mc.MAX_RESULT_ENV, "100")
    tool_llm.planned = [("lorem", {"size": 5000})]
    with McpServer(token=TOKEN) as server:
        run, node_id = run_node(sqlite_app_db_url, node(server), llm=_llm(tool_llm))
    assert run.result.success
    assert len(node_data(sqlite_app_db_url, node_id)["text"]) == 100
    assert execution(sqlite_app_db_url, run.exec_id).metadata_["truncated"] is True


def test_offline_model_picks_the_selected_tool(sqlite_app_db_url, allow_loopback):
    with McpServer(token=TOKEN) as server:
        run, node_id = run_node(sqlite_app_db_url, node(server, toolName="shout", prompt="quiet words"))
    assert run.result.success
    assert node_data(sqlite_app_db_url, node_id)["text"] == "QUIET WORDS"


@pytest.mark.parametrize("data,message", [
    ({"serverUrl": "stdio://python server.py"}, "stdio servers are refused"),
    ({"serverUrl": "npx my-server"}, "stdio servers are refused"),
    ({"serverUrl": ""}, "The MCP server URL is empty."),
    ({"integrationId": "int-1"}, "MCP integrations (integrationId) are not supported by this worker"),
])
def test_refused_servers(sqlite_app_db_url, data, message):
    run, node_id = run_node(sqlite_app_db_url, {"prompt": "x", **data})
    assert_failed(sqlite_app_db_url, run, node_id, message)


def test_loopback_server_refused_unless_allowed_and_bad_token(sqlite_app_db_url, tool_llm, fake_main_api, monkeypatch):
    monkeypatch.delenv(mc.ALLOWED_HOSTS_ENV, raising=False)
    with McpServer(token=TOKEN) as server:
        run, node_id = run_node(sqlite_app_db_url, node(server), llm=_llm(tool_llm), main_api=fake_main_api)
        assert_failed(sqlite_app_db_url, run, node_id, "unless FLUX_MCP_ALLOWED_HOSTS allows them")
        assert server.authorizations == []
        monkeypatch.setenv(mc.ALLOWED_HOSTS_ENV, "127.0.0.1/32")
        run, node_id = run_node(sqlite_app_db_url, node(server, authToken="wrong"), llm=_llm(tool_llm),
                                main_api=fake_main_api)
        assert_failed(sqlite_app_db_url, run, node_id, "The MCP server refused the credentials (HTTP 401)")
    assert tool_llm.tool_requests() == [] and fake_main_api.charges == {}


def test_offline_choice_and_schema_check():
    tools = [ToolSpec("add", "", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]})]
    choice = offline_choice("hi", tools)
    assert (choice.name, choice.arguments) == ("add", {"a": 0, "b": 0})
    check_arguments(choice, tools)
    with pytest.raises(Exception, match="which was not offered"):
        check_arguments(ToolChoice("rm", {}, 1, 1, "x"), tools)


def test_in_an_agent_a_retried_charge_does_not_call_the_tool_again(sqlite_app_db_url, tool_llm, fake_main_api,
                                                                   allow_loopback):
    tool_llm.planned = [("shout", {"text": "once"})]
    fake_main_api.charge_failures = [502]  # process_agent retries the node's stages: only the charge again
    with McpServer(token=TOKEN) as server:
        flow_id = add_flow(sqlite_app_db_url, {"tool": (mc.NODE_TYPE, node(server)), "show-tool": ("outputController", {})},
                           [("tool", "show-tool")])
        run = execute_agent(sqlite_app_db_url, make_resources(sqlite_app_db_url, llm=_llm(tool_llm),
                                                              main_api=fake_main_api), flow_id)
    assert run.result.success
    assert server.calls == [("shout", {"text": "once"})] and len(tool_llm.tool_requests()) == 1
    assert len(fake_main_api.charges) == 1 and len(fake_main_api.calls("/worker/charge-tokens")) == 2
    assert node_data(sqlite_app_db_url, "show-tool")["text"] == "ONCE"
