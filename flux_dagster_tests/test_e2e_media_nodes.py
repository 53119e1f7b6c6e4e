"""The media and tool nodes (audio transcriber, MCP client, image providers) end to end through a
real daemon and code server: one deployment for the whole module (SQLite app DB and storage),
every provider a loopback server speaking its wire format, each node type as a node execution
(``process_single_node``) and inside an agent (``process_agent``)."""

import uuid

import pytest

from flux_dagster import queue
from flux_dagster.db.engine import create_schema, session_scope
from flux_dagster.nodes import audio_transcriber as at
from flux_dagster.nodes import image_generator as ig
from flux_dagster.nodes import mcp_client as mc
from flux_dagster_tests.conftest import add_flow, add_node, enqueue_agent, execution, node_data
from flux_dagster_tests.fakes.http import LoopbackServer
from flux_dagster_tests.fakes.images import KEYS, FakeImageProviders, image_of
from flux_dagster_tests.fakes.main_api import FakeMainApi
from flux_dagster_tests.fakes.mcp_server import McpServer
from flux_dagster_tests.fakes.media import FakeSearchApi, FakeTranscriptionApi, FileHost, make_audio
from flux_dagster_tests.fakes.tool_llm import FakeToolLlm
from flux_dagster_tests.test_e2e_daemon import deployment, runs_by_row, wait_terminal

pytestmark = pytest.mark.e2e


class Stack:
    """The fakes of this module, and the app DB the deployment uses."""

    def __init__(self, app_url: str):
        self.app_url = app_url
        self.llm = FakeToolLlm()
        self.transcription = FakeTranscriptionApi()
        # One OpenAI base URL for the deployment: each path goes to the fake that speaks it.
        self.openai = LoopbackServer(lambda req: (self.transcription if "/audio/" in req.path else self.llm).handle(req))
        self.search = FakeSearchApi()
        self.files = FileHost()
        self.main_api = FakeMainApi()
        self.mcp = McpServer("sse", token="mcp-e2e")  # SSE: the client falls back to it after Streamable HTTP
        self.images = FakeImageProviders()
        self.servers = [self.openai, self.search, self.files, self.main_api, self.mcp, self.images]

    def env(self) -> dict[str, str]:
        return {
            "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{self.openai.url}/v1",
            "URL_MAIN_API": self.main_api.url, "INTERNAL_API_KEY": self.main_api.api_key,
            "SEARCH_API_KEY": self.search.api_key, "SEARCH_API_BASE_URL": f"{self.search.url}/api/v1",
            at.ALLOWED_HOSTS_ENV: "127.0.0.1/32", mc.ALLOWED_HOSTS_ENV: "127.0.0.1/32",
            ig.INPUT_IMAGE.allowed_hosts_env: "127.0.0.1/32",
            "GENAI_API_KEY": KEYS["gemini"], "GEMINI_IMAGES_BASE_URL": self.images.base_url("gemini"),
            "FAL_KEY": KEYS["fal"], "FAL_BASE_URL": self.images.base_url("fal"),
            "STABILITY_API_KEY": KEYS["stabilityai"], "STABILITY_BASE_URL": self.images.base_url("stabilityai"),
            "IDEOGRAM_API_KEY": KEYS["ideogram"], "IDEOGRAM_BASE_URL": self.images.base_url("ideogram"),
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("media_e2e")
    app_url = f"sqlite:///{tmp / 'app.db'}"
    create_schema(app_url)
    from flux_dagster import demo

    with session_scope(app_url) as s:
        demo.seed(s)
    stack = Stack(app_url)
    for server in stack.servers:
        server.__enter__()
    try:
        with deployment(tmp, app_url, stack.env()) as env:
            stack.deployment_env = env
            yield stack
    finally:
        for server in stack.servers:
            server.__exit__(None, None, None)


def insert_node(stack: Stack, node_type: str, data: dict) -> tuple[int, str, str]:
    """Insert a node and its execution row; the daemon does the rest."""
    flow_id, node_id = add_node(stack.app_url, node_type, data)
    with session_scope(stack.app_url) as s:
        row = queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                            user_id="user-1", session_id="s")
        return row.id, node_id, row.exec_id


def run_node(stack: Stack, node_type: str, data: dict):
    pending_id, node_id, exec_id = insert_node(stack, node_type, data)
    return wait_terminal(stack.app_url, [pending_id])[pending_id], node_id, exec_id


def test_audio_transcriber_node_and_agent(stack, tmp_path):
    stack.files.files["/clip.mp3"] = open(make_audio(str(tmp_path / "clip.mp3"), 7), "rb").read()
    row, node_id, exec_id = run_node(stack, at.NODE_TYPE, {"inputPreview": f"{stack.files.url}/clip.mp3"})
    assert row.status == "completed", row.error
    assert node_data(stack.app_url, node_id)["text"] == "whisper-1: 7 s of audio"
    assert execution(stack.app_url, exec_id).status == "COMPLETED"

    stack.search.transcripts["dQw4w9WgXcQ"] = ["a", "video"]
    flow_id = add_flow(stack.app_url, {
        "listen": (at.NODE_TYPE, {"inputPreview": f"{stack.files.url}/clip.mp3", "aiModel": "openAi"}),
        "watch": (at.NODE_TYPE, {"type": "ytTranscript", "youtubeUrl": "https://youtu.be/dQw4w9WgXcQ"}),
        "show-audio": ("outputController", {}),
    }, [("listen", "show-audio"), ("watch", "show-audio")])
    pending_id, _ = enqueue_agent(stack.app_url, flow_id)
    agent_row = wait_terminal(stack.app_url, [pending_id])[pending_id]
    assert agent_row.status == "completed", agent_row.error
    assert node_data(stack.app_url, "show-audio")["text"] == "whisper-1: 7 s of audio\na video"
    runs = runs_by_row(stack.deployment_env)
    assert (runs[str(row.id)], runs[str(pending_id)]) == (["SUCCESS"], ["SUCCESS"])


def test_mcp_client_node_and_agent(stack):
    stack.llm.planned = [("add", {"a": 20, "b": 22}), ("shout", {"text": "agent"})]
    mcp_node = {"prompt": "Add 20 and 22.", "serverUrl": stack.mcp.url, "authToken": "mcp-e2e"}
    row, node_id, exec_id = run_node(stack, mc.NODE_TYPE, mcp_node)
    assert row.status == "completed", row.error
    assert node_data(stack.app_url, node_id)["text"] == "42"
    assert execution(stack.app_url, exec_id).metadata_["transport"] == "sse"

    flow_id = add_flow(stack.app_url, {"tool": (mc.NODE_TYPE, {**mcp_node, "prompt": "Shout agent."}),
                                       "show-mcp": ("outputController", {})}, [("tool", "show-mcp")])
    pending_id, agent_exec_id = enqueue_agent(stack.app_url, flow_id)
    agent_row = wait_terminal(stack.app_url, [pending_id])[pending_id]
    assert agent_row.status == "completed", agent_row.error
    assert node_data(stack.app_url, "show-mcp")["text"] == "AGENT"
    assert stack.mcp.calls[-2:] == [("add", {"a": 20, "b": 22}), ("shout", {"text": "agent"})]
    charged = [c for c in stack.main_api.charges.values() if c["execId"] in (exec_id, agent_exec_id)]
    assert len(charged) == 2


def test_image_providers_node_and_agent(stack):
    """Each provider as a node execution (all queued at once), then image-to-image in an agent."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    models = {"gemini": "aiModel", "fal": "falModel", "stabilityai": "engineId", "ideogram": "ideogramModel"}
    inserted = {p: insert_node(stack, ig.NODE_TYPE, {"aiSystem": p, "prompt": f"A {p} kite"}) for p in models}
    rows = wait_terminal(stack.app_url, [pending_id for pending_id, _, _ in inserted.values()])
    for provider, (pending_id, node_id, exec_id) in inserted.items():
        assert rows[pending_id].status == "completed", (provider, rows[pending_id].error)
        link = node_data(stack.app_url, node_id)["text"]
        assert Path(unquote(urlparse(link).path)).read_bytes() == image_of(provider)
        [charged] = [c for c in stack.main_api.charges.values() if c["execId"] == exec_id]
        assert charged["aiSystem"] == provider

    stack.files.files["/photo.png"] = image_of("input")
    flow_id = add_flow(stack.app_url, {
        "paint": (ig.NODE_TYPE, {"aiSystem": "ideogram", "prompt": "Night", "inputPreview": f"{stack.files.url}/photo.png"}),
        "show-image": ("outputController", {}),
    }, [("paint", "show-image")])
    pending_id, _ = enqueue_agent(stack.app_url, flow_id)
    agent_row = wait_terminal(stack.app_url, [pending_id])[pending_id]
    assert agent_row.status == "completed", agent_row.error
    assert node_data(stack.app_url, "show-image")["text"] == node_data(stack.app_url, "paint")["text"]
    assert stack.images.calls_of("ideogram")[-1].path == "/ideogram/remix"
