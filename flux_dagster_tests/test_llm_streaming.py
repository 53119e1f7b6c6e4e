"""The providers with the real openai and anthropic SDKs against a loopback server speaking each
wire format: streams, web search, image parts, cancellation mid-stream; usage shapes; throttling."""

import json

import pytest

from flux_dagster.errors import UserConfigError
from flux_dagster.execution import ExecutionRequest
from flux_dagster.llm import usage
from flux_dagster.llm.providers import GenerationOptions, GenerationRequest, LlmClient, ProviderCredentials, StreamState
from flux_dagster.services.notifications import StreamPublisher


@pytest.fixture
def client(fake_llm):
    creds = {
        "openai": ProviderCredentials("sk-test", f"{fake_llm.url}/v1"),
        "anthropic": ProviderCredentials("sk-ant-test", fake_llm.url),
        "groq": ProviderCredentials("gsk-test", f"{fake_llm.url}/openai/v1"),
        "perplexity": ProviderCredentials("pplx-test", f"{fake_llm.url}/perplexity"),
    }
    return LlmClient(credentials=creds, timeout_s=10)


def request(company, model="m", **options):
    images = options.pop("images", ())
    return GenerationRequest(company=company, model=model, system="Be brief.",
                             messages=({"role": "user", "content": "Hi there"},),
                             options=GenerationOptions(**options), images=images)


def last_body(fake_llm):
    return fake_llm.requests[-1].body


# --- usage shapes -------------------------------------------------------------------------------


def test_chat_usage_reasoning_inside_the_completion_is_not_added_again():
    shape = {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60,
             "completion_tokens_details": {"reasoning_tokens": 30}}
    assert usage.from_chat(shape) == usage.Usage(10, 50, 30)


def test_chat_usage_reasoning_reported_beside_the_completion_is_charged():
    # xAI / Gemini's OpenAI endpoint: total = prompt + completion + reasoning
    shape = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 60,
             "completion_tokens_details": {"reasoning_tokens": 30}}
    assert usage.from_chat(shape) == usage.Usage(10, 50, 30)


def test_responses_usage_and_anthropic_cache_and_thinking():
    assert usage.from_responses({"input_tokens": 5, "output_tokens": 40,
                                 "output_tokens_details": {"reasoning_tokens": 25}}) == usage.Usage(5, 40, 25)
    shape = {"input_tokens": 3, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000,
             "output_tokens": 70, "output_tokens_details": {"thinking_tokens": 60}}
    assert usage.from_anthropic(shape) == usage.Usage(1103, 70, 60)
    assert usage.from_chat({}) is None and usage.from_anthropic(None) is None


def test_settle_counts_what_was_not_reported():
    assert usage.settle(None, prompt="x" * 40, output="y" * 9, cut_short=False) == usage.Usage(10, 3, estimated=True)
    reported = usage.Usage(12, 1)  # Anthropic's message_start, before the answer
    assert usage.settle(reported, prompt="x" * 40, output="y" * 80, cut_short=True) == usage.Usage(12, 20, estimated=True)
    assert usage.settle(usage.Usage(12, 30), prompt="", output="y" * 8, cut_short=False) == usage.Usage(12, 30)


def test_a_stream_without_usage_is_counted(client, fake_llm):
    fake_llm.usage = {}  # the provider reports no usage …
    gen = client.generate(request("groq"))
    assert gen.estimated  # … counted
    assert gen.output_tokens == usage.count_tokens(fake_llm.text)


# --- streams equal the non-streaming answer --------------------------------------------------------


@pytest.mark.parametrize("company", ["openai", "groq", "anthropic"])
def test_the_stream_gives_the_non_streaming_answer(client, fake_llm, company):
    fake_llm.chunks = 7
    seen: list[str] = []
    gen = client.generate(request(company), StreamState(on_text=seen.append))
    assert last_body(fake_llm).get("stream") is True
    assert (gen.text, gen.input_tokens, gen.output_tokens, gen.estimated) == (fake_llm.text, 11, 7, False)
    assert len(seen) == len(fake_llm.pieces()) > 1 and seen[-1] == fake_llm.text and all(fake_llm.text.startswith(s) for s in seen)
    # the same request without streaming, through the same SDK: same text and usage
    if company == "anthropic":
        import anthropic

        sdk = anthropic.Anthropic(api_key="k", base_url=fake_llm.url, max_retries=0)
        message = sdk.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
        assert (message.content[0].text, message.usage.input_tokens, message.usage.output_tokens) == (gen.text, 11, 7)
    else:
        import openai

        base = f"{fake_llm.url}/v1" if company == "openai" else f"{fake_llm.url}/openai/v1"
        completion = openai.OpenAI(api_key="k", base_url=base, max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}])
        assert (completion.choices[0].message.content, completion.usage.prompt_tokens,
                completion.usage.completion_tokens) == (gen.text, 11, 7)


def test_openai_reasoning_tokens_and_anthropic_thinking(client, fake_llm):
    fake_llm.reasoning, fake_llm.reasoning_tokens = "Let me think.", 5
    gen = client.generate(request("openai"))
    assert (gen.reasoning, gen.output_tokens, gen.reasoning_tokens) == ("Let me think.", 7, 5)
    fake_llm.usage = {"input_tokens": 9, "output_tokens": 40, "output_tokens_details": {"thinking_tokens": 30}}
    gen = client.generate(request("anthropic", reasoning=True, max_tokens=4096))
    assert last_body(fake_llm)["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert (gen.reasoning, gen.input_tokens, gen.output_tokens, gen.reasoning_tokens) == ("Let me think.", 9, 40, 30)


# --- web search ---------------------------------------------------------------------------------


def test_openai_web_search_uses_the_responses_api(client, fake_llm):
    gen = client.generate(request("openai", web_search=True))
    call = fake_llm.requests[-1]
    assert call.path == "/v1/responses" and call.body["tools"] == [{"type": "web_search"}]
    assert gen.text == fake_llm.text and (gen.input_tokens, gen.output_tokens) == (11, 7)
    assert [s["url"] for s in gen.sources] == ["https://example.org/a", "https://example.org/b"]
    assert gen.tool_calls[0]["toolName"] == "web_search" and gen.tool_calls[0]["input"]["query"] == "loopback query"
    assert [s["url"] for s in gen.tool_results[0]["output"]["sources"]] == ["https://example.org/a", "https://example.org/b"]


def test_anthropic_web_search_tool_with_max_uses(client, fake_llm):
    gen = client.generate(request("anthropic", web_search=True, web_search_max_uses=2))
    assert last_body(fake_llm)["tools"] == [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
    assert gen.text == fake_llm.text
    assert [(s["url"], s["title"]) for s in gen.sources] == fake_llm.search_results
    assert gen.tool_calls == ({"toolCallId": gen.tool_calls[0]["toolCallId"], "toolName": "web_search",
                               "input": {"query": "loopback query"}},)
    assert [r["url"] for r in gen.tool_results[0]["output"]] == ["https://example.org/a", "https://example.org/b"]


def test_perplexity_citations_are_kept(client, fake_llm):
    gen = client.generate(request("perplexity", web_search=True))
    assert [(s["url"], s["title"]) for s in gen.sources] == fake_llm.search_results
    assert "tools" not in last_body(fake_llm)


def test_a_provider_that_cannot_search_fails_instead_of_answering_without(client, fake_llm):
    with pytest.raises(UserConfigError, match="Web search is not available for groq"):
        client.generate(request("groq", web_search=True))
    assert fake_llm.requests == []


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("company,web_search,part", [
    ("openai", False, {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}}),
    ("openai", True, {"type": "input_image", "image_url": "https://img.example/cat.png", "detail": "auto"}),
    ("anthropic", False, {"type": "image", "source": {"type": "url", "url": "https://img.example/cat.png"}}),
])
def test_image_parts_in_each_wire_format(client, fake_llm, company, web_search, part):
    client.generate(request(company, web_search=web_search, images=("https://img.example/cat.png",)))
    body = last_body(fake_llm)
    last = (body.get("input") or body["messages"])[-1]
    assert last["role"] == "user" and last["content"][1] == part
    assert last["content"][0]["text"] == "Hi there"


# --- cancellation mid-stream ----------------------------------------------------------------------


@pytest.mark.parametrize("company,web_search", [("openai", False), ("openai", True), ("anthropic", False)])
def test_a_cancelled_stream_is_closed_and_keeps_its_partial_answer(client, fake_llm, company, web_search):
    fake_llm.text, fake_llm.chunks, fake_llm.chunk_delay_s = "word " * 200, 200, 0.01
    seen: list[str] = []
    gen = client.generate(request(company, web_search=web_search), StreamState(on_text=seen.append),
                          should_stop=lambda: len(seen) >= 3)
    assert gen.cancelled and gen.text == "word " * 3 and gen.finish_reason is None
    assert gen.output_tokens == usage.count_tokens("word " * 3) and gen.estimated
    assert gen.input_tokens == (11 if company == "anthropic" else usage.count_tokens(request(company).prompt_text))


# --- throttled publishing -----------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.messages = []

    def publish_stream(self, request, node_id, payload):
        self.messages.append(payload)


def test_stream_publisher_throttles_and_always_sends_the_final_message():
    now = [0.0]
    recorder = Recorder()
    publisher = StreamPublisher(recorder, ExecutionRequest("e", "f", "u", socket_id="sock"), "n", _clock=lambda: now[0])
    for i in range(100):  # 100 pieces over one second
        publisher.update("x" * (i + 1))
        now[0] += 0.01
    publisher.finish("x" * 100, "COMPLETED", 3, 4)
    assert 18 <= len(recorder.messages) <= 21
    assert recorder.messages[-1] == {"seq": len(recorder.messages), "text": "x" * 100, "done": True,
                                     "status": "COMPLETED", "tokens": {"input": 3, "output": 4}}
    assert [m["seq"] for m in recorder.messages] == list(range(1, len(recorder.messages) + 1))
    json.dumps(recorder.messages)


def test_groq_stream_usage_under_x_groq():
    from openai.types.chat import ChatCompletionChunk

    from flux_dagster.llm.providers import _chat_chunk

    state = StreamState()
    _chat_chunk(state, ChatCompletionChunk.model_validate({
        "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "x_groq": {"usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}}))
    assert state.usage == usage.Usage(4, 6) and state.finish_reason == "stop"


# --- images of the prompt -------------------------------------------------------------------------


def vision_model(**kw):
    from flux_dagster.db.models import SystemAiModel

    return SystemAiModel(**{"modelName": "v", "aiCompany": "openai", "isVisionModel": True, **kw})


def test_image_urls_of_the_prompt_become_parts_at_most_three():
    from flux_dagster.nodes import text_generator as tg

    urls = [f"http://93.184.216.34/{i}.JPG" for i in range(4)]
    data = {"multimodalEnabled": True, "promptData": [{"text": f"look {urls[0]} {urls[1]}"}],
            "prompt": f"and {urls[2]}, {urls[3]} and http://93.184.216.34/page"}
    stripped, images = tg.extract_images(data, vision_model())
    assert images == tuple(urls[:3])
    assert stripped["promptData"] == [{"text": "look"}]
    assert stripped["prompt"] == f"and , {urls[3]} and http://93.184.216.34/page"
    assert tg.extract_images({**data, "multimodalEnabled": False}, vision_model()) == ({**data, "multimodalEnabled": False}, ())


def test_images_need_a_vision_model_and_a_public_http_url():
    from flux_dagster.nodes import text_generator as tg

    with pytest.raises(UserConfigError, match="cannot read images"):
        tg.extract_images({"multimodalEnabled": True, "prompt": "http://93.184.216.34/a.png"}, vision_model(isVisionModel=False))
    with pytest.raises(UserConfigError, match="non-public address 10.0.0.5"):
        tg.extract_images({"multimodalEnabled": True, "prompt": "https://10.0.0.5/a.png"}, vision_model())
