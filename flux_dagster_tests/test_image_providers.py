"""Image generator providers besides OpenAI text-to-image — gemini (google-genai SDK), fal,
Stability and Ideogram (their HTTP APIs), OpenAI image edits — each against a loopback server
speaking its wire format, text-to-image and image-to-image, with the reference's charge timing."""

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from flux_dagster.errors import UserConfigError
from flux_dagster.execution import ExecutionRequest, NodeTask
from flux_dagster.files.store import StoredObject
from flux_dagster.nodes import image_generator as ig
from flux_dagster.resources import LlmResource, MediaApisResource
from flux_dagster.services.main_api import MainApi
from flux_dagster_tests.conftest import add_node, assert_failed, execute_node, execution, make_resources, node_data
from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply
from flux_dagster_tests.fakes.images import KEYS, FakeImageProviders, image_of
from flux_dagster_tests.fakes.main_api import FakeMainApi
from flux_dagster_tests.fakes.media import FileHost, multipart_fields

INPUT = ig.placeholder_png(ig.ImageSpec("input", "input", "1x1"), word="IN")


@pytest.fixture
def providers():
    with FakeImageProviders() as server:
        yield server


@pytest.fixture
def input_host(monkeypatch):
    monkeypatch.setenv(ig.INPUT_IMAGE.allowed_hosts_env, "127.0.0.1/32")
    with FileHost() as host:
        host.files["/in.png"] = INPUT
        yield host


def media(server) -> MediaApisResource:
    return MediaApisResource(
        gemini_key=KEYS["gemini"], gemini_base_url=server.base_url("gemini"),
        fal_key=KEYS["fal"], fal_base_url=server.base_url("fal"),
        stability_key=KEYS["stabilityai"], stability_base_url=server.base_url("stabilityai"),
        ideogram_key=KEYS["ideogram"], ideogram_base_url=server.base_url("ideogram"),
    )


def run_node(url, data, server, **resource_kw):
    flow_id, node_id = add_node(url, ig.NODE_TYPE, data)
    resources = make_resources(url, media_apis=media(server), **resource_kw)
    return execute_node(url, resources, flow_id, node_id), node_id


def stored_bytes(url, node_id) -> bytes:
    return Path(unquote(urlparse(node_data(url, node_id)["text"]).path)).read_bytes()


CASES = {
    "gemini": {"aiModel": "gemini-2.5-flash-image"},
    "fal": {"falModel": "fal-ai/flux/dev"},
    "stabilityai": {"engineId": "stable-diffusion-xl-1024-v1-0"},
    "ideogram": {"ideogramModel": "V_2"},
}


@pytest.mark.parametrize("provider", list(CASES))
def test_text_to_image(sqlite_app_db_url, providers, fake_main_api, provider):
    url = sqlite_app_db_url
    data = {"aiSystem": provider, **CASES[provider], "prompt": "A red kite", "aspectRatio": "16:9",
            "negativePrompt": "clouds"}
    run, node_id = run_node(url, data, providers, main_api=fake_main_api)
    assert run.result.success
    assert stored_bytes(url, node_id) == image_of(provider)
    [call] = providers.calls_of(provider)
    body = call.body
    if provider == "gemini":
        assert call.path == "/v1/models/gemini-2.5-flash-image:generateContent"
        assert body["contents"][0]["parts"] == [{"text": "A red kite"}]
        assert body["generationConfig"] == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "16:9"}}
    elif provider == "fal":
        assert call.path == "/fal/fal-ai/flux/dev"
        assert body == {"prompt": "A red kite", "image_size": "landscape_16_9", "num_images": 1, "sync_mode": False,
                        "negative_prompt": "clouds"}
    elif provider == "stabilityai":
        assert call.path == "/stability/v1/generation/stable-diffusion-xl-1024-v1-0/text-to-image"
        assert body["text_prompts"] == [{"text": "A red kite", "weight": 1.0}, {"text": "clouds", "weight": -1.0}]
        assert (body["width"], body["height"]) == (1344, 768)
    else:
        assert call.path == "/ideogram/generate"
        assert body["image_request"] == {"prompt": "A red kite", "model": "V_2", "magic_prompt_option": "AUTO",
                                         "aspect_ratio": "ASPECT_16_9", "negative_prompt": "clouds"}
    [charged] = fake_main_api.charges.values()
    assert (charged["aiSystem"], charged["usedTokens"], charged["execId"]) == (provider, 1, run.exec_id)
    assert len(fake_main_api.calls("/worker/charge-tokens")) == 1  # the early charges are found done
    row = execution(url, run.exec_id)
    assert (row.metadata_["aiSystem"], row.metadata_["provider"], row.outputType) == (provider, provider, "image")


@pytest.mark.parametrize("provider", list(CASES))
def test_image_to_image(sqlite_app_db_url, providers, input_host, provider):
    url = sqlite_app_db_url
    data = {"aiSystem": provider, **CASES[provider], "prompt": "Make it night", "aspectRatio": "1:1",
            "inputPreviewData": [{"text": f"{input_host.url}/in.png"}]}
    run, node_id = run_node(url, data, providers)
    assert run.result.success
    assert stored_bytes(url, node_id) == image_of(provider)
    [call] = providers.calls_of(provider)
    if provider == "gemini":
        parts = call.body["contents"][0]["parts"]
        assert parts[1]["inlineData"]["mime_type"] == "image/png"
        import base64

        assert base64.urlsafe_b64decode(parts[1]["inlineData"]["data"]) == INPUT  # the SDK sends URL-safe base64
    elif provider == "fal":  # fal fetches the image itself
        assert call.body["image_url"] == f"{input_host.url}/in.png"
        assert input_host.requests == []
    elif provider == "stabilityai":
        assert call.path.endswith("/image-to-image")
        fields = multipart_fields(call)
        assert fields["init_image"][1] == INPUT and fields["text_prompts[0][text]"][1] == b"Make it night"
    else:
        assert call.path == "/ideogram/remix"
        fields = multipart_fields(call)
        assert fields["image_file"][1] == INPUT and b'"prompt": "Make it night"' in fields["image_request"][1]
    assert execution(url, run.exec_id).metadata_["imageToImage"] is True


class OpenAiEdits(LoopbackServer):
    """OpenAI's multipart ``POST /v1/images/edits``."""

    def __init__(self):
        super().__init__(self._handle)

    def _handle(self, req: Recorded) -> Reply:
        import base64

        if req.path != "/v1/images/edits":
            return Reply(404, {"error": {"message": "no route"}})
        return Reply(200, {"created": 1, "data": [{"b64_json": base64.b64encode(image_of("openai")).decode()}]})


def test_openai_image_edit(sqlite_app_db_url, input_host):
    with OpenAiEdits() as api:
        llm = LlmResource(offline=False, openai_api_key="sk-img", openai_base_url=f"{api.url}/v1", timeout_s=10)
        flow_id, node_id = add_node(sqlite_app_db_url, ig.NODE_TYPE, {"aiModel": "gpt-image-1", "prompt": "Night",
                                                                      "inputPreview": f"{input_host.url}/in.png"})
        run = execute_node(sqlite_app_db_url, make_resources(sqlite_app_db_url, llm=llm), flow_id, node_id)
    assert run.result.success
    [edit] = api.requests
    fields = multipart_fields(edit)
    assert fields["image"][1] == INPUT and fields["prompt"][1] == b"Night" and fields["model"][1] == b"gpt-image-1"
    assert stored_bytes(sqlite_app_db_url, node_id) == image_of("openai")


class OrderedMainApi(FakeMainApi):
    def __init__(self, events: list[str]):
        self.events = events
        super().__init__()

    def _handle(self, req: Recorded) -> Reply:
        if req.path == "/worker/charge-tokens":
            self.events.append("charge")
        return super()._handle(req)


class RecordingStore:
    def __init__(self, events: list[str]):
        self.events = events

    def save(self, key, content, *, content_type, download_name):
        self.events.append("store")
        return StoredObject(key=key, src=f"file:///{key}")


@pytest.mark.parametrize("provider,order", [
    ("stabilityai", ["charge", "call stabilityai", "store"]),  # before the call
    ("ideogram", ["call ideogram", "charge", "store"]),  # after the call
    ("gemini", ["call gemini", "store", "charge"]),  # SDK providers: after storing
    ("fal", ["call fal", "store", "charge"]),
])
def test_charge_timing_per_provider(sqlite_app_db_url, providers, provider, order):
    from flux_dagster.db.engine import session_scope

    events: list[str] = []
    providers.events = events
    flow_id, node_id = add_node(sqlite_app_db_url, ig.NODE_TYPE, {"aiSystem": provider, "prompt": "x"})
    task = NodeTask(ExecutionRequest(exec_id="e1", flow_id=flow_id, user_id="user-1"), node_id, ig.NODE_TYPE,
                    {"aiSystem": provider, "prompt": "x"})
    with OrderedMainApi(events) as api:
        main_api = MainApi(database_url=sqlite_app_db_url, url=api.url, api_key=api.api_key)
        image = ig.generate_and_store(lambda: session_scope(sqlite_app_db_url), task, llm=LlmResource(offline=False).client(),
                                      store=RecordingStore(events), generation_id="g1", main_api=main_api,
                                      media=media(providers).client())
        ig.charge_image(main_api, task, image)
        # the last charge of an early-charged image is answered from the ledger: no second HTTP call
        assert len(api.charges) == 1 and len(api.calls("/worker/charge-tokens")) == 1
    assert events == order


def test_provider_refusal_fails_without_retry_and_5xx_is_retried(sqlite_app_db_url, providers, fake_main_api):
    providers.failures = {"ideogram": [400], "stabilityai": [503]}
    run, node_id = run_node(sqlite_app_db_url, {"aiSystem": "ideogram", "prompt": "x"}, providers, main_api=fake_main_api)
    assert_failed(sqlite_app_db_url, run, node_id, "ideogram request failed (HTTP 400): fake 400")
    assert len(providers.calls_of("ideogram")) == 1 and fake_main_api.charges == {}
    run, node_id = run_node(sqlite_app_db_url, {"aiSystem": "stabilityai", "prompt": "x"}, providers,
                            main_api=fake_main_api)
    assert run.result.success and len(providers.calls_of("stabilityai")) == 2
    # charged before each call, with one key: one charge
    assert len(fake_main_api.charges) == 1


def test_fal_sync_mode_data_uri(sqlite_app_db_url, providers):
    run, node_id = run_node(sqlite_app_db_url, {"aiSystem": "fal", "prompt": "x", "sync_mode": True}, providers)
    assert run.result.success and stored_bytes(sqlite_app_db_url, node_id) == image_of("fal")
    assert [r.path for r in providers.requests] == ["/fal/fal-ai/flux/schnell"]  # nothing downloaded


@pytest.mark.parametrize("data,message", [
    ({"aiSystem": "meta"}, "Meta offers no public image-generation API"),
    ({"aiSystem": "ideogram", "ideogramModel": "V_3"}, "Ideogram 3.0 models are not supported"),
    ({"aiSystem": "gemini", "inputPreview": "http://127.0.0.1:9/in.png"}, "FLUX_IMAGE_ALLOWED_HOSTS"),
])
def test_refusals(sqlite_app_db_url, providers, data, message, monkeypatch):
    monkeypatch.delenv(ig.INPUT_IMAGE.allowed_hosts_env, raising=False)
    run, node_id = run_node(sqlite_app_db_url, {"prompt": "x", **data}, providers)
    assert_failed(sqlite_app_db_url, run, node_id, message)


def test_provider_without_key_is_an_error_unless_offline():
    spec = ig.image_spec({"aiSystem": "fal", "prompt": "x"})
    with pytest.raises(Exception, match=r"No API key is configured for fal \(FAL_KEY\)"):
        ig.generate(spec, LlmResource(offline=False).client())
    assert ig.generate(spec, LlmResource(offline=True).client()).provider == "offline"
    with pytest.raises(UserConfigError, match="not supported by this worker"):
        ig.image_spec({"aiSystem": "midjourney", "prompt": "x"})
