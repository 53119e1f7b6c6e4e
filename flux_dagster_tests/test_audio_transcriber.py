"""Audio transcriber (``audioReaderNode``): real MP3s made by ffmpeg, downloaded from a loopback
file host through the network guard, sent by the openai SDK to a loopback server speaking the
multipart ``/audio/transcriptions`` API (which measures each upload with ffprobe); YouTube
transcripts from a loopback SearchAPI."""

import pytest

from flux_dagster.errors import UserConfigError
from flux_dagster.nodes import audio_transcriber as at
from flux_dagster.resources import LlmResource, MediaApisResource
from flux_dagster_tests.conftest import add_node, assert_failed, execute_node, execution, make_resources, node_data
from flux_dagster_tests.fakes.media import FakeSearchApi, FakeTranscriptionApi, FileHost, make_audio


@pytest.fixture(scope="module")
def long_mp3(tmp_path_factory) -> bytes:
    """21 min 40 s of real audio, 1.3 MB."""
    return open(make_audio(str(tmp_path_factory.mktemp("audio") / "long.mp3"), 1300), "rb").read()


@pytest.fixture(scope="module")
def short_mp3(tmp_path_factory) -> bytes:
    return open(make_audio(str(tmp_path_factory.mktemp("audio") / "short.mp3"), 5), "rb").read()


@pytest.fixture
def transcription_api():
    with FakeTranscriptionApi() as server:
        yield server


@pytest.fixture
def files(monkeypatch):
    monkeypatch.setenv(at.ALLOWED_HOSTS_ENV, "127.0.0.1/32")
    with FileHost() as server:
        yield server


def _llm(server) -> LlmResource:
    return LlmResource(offline=False, openai_api_key="sk-audio", openai_base_url=f"{server.url}/v1",
                       groq_api_key="gsk-audio", groq_base_url=f"{server.url}/openai/v1", timeout_s=10)


def run_node(url, data, **resource_kw):
    flow_id, node_id = add_node(url, at.NODE_TYPE, data)
    return execute_node(url, make_resources(url, **resource_kw), flow_id, node_id), node_id


@pytest.mark.parametrize("model,expected", [("openAi", ("openai", "whisper-1")), (None, ("openai", "whisper-1")),
                                            ("groq", ("groq", "whisper-large-v3")),
                                            ("groq_v3_turbo", ("groq", "whisper-large-v3-turbo"))])
def test_models(model, expected):
    assert at.model_of({"aiModel": model}) == expected


@pytest.mark.parametrize("value", ["https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=4", "https://youtu.be/dQw4w9WgXcQ",
                                   "youtube.com/shorts/dQw4w9WgXcQ", "https://www.youtube.com/embed/dQw4w9WgXcQ",
                                   "dQw4w9WgXcQ"])
def test_youtube_video_ids(value):
    assert at.video_id_of(value) == "dQw4w9WgXcQ"


@pytest.mark.parametrize("value", ["https://example.com/watch?v=dQw4w9WgXcQ", "https://www.youtube.com/", "a b"])
def test_not_youtube_urls(value):
    with pytest.raises(UserConfigError, match="not a YouTube video URL"):
        at.video_id_of(value)


def test_large_file_is_split_into_600s_segments_and_joined(app_db_url, transcription_api, files, long_mp3, monkeypatch):
    monkeypatch.setenv(at.SPLIT_BYTES_ENV, "1000000")  # the real limit is 24 MB: this 1.3 MB file stands in
    files.files["/talk.mp3"] = long_mp3
    files.redirects["/latest"] = "/talk.mp3"  # redirects are followed, each hop through the guard
    run, node_id = run_node(app_db_url, {"inputPreview": f"{files.url}/latest", "aiModel": "openAi",
                                         "previewResponses": ["earlier"]}, llm=_llm(transcription_api))
    assert run.result.success
    uploads = transcription_api.uploads
    assert [round(u["seconds"] / 10) * 10 for u in uploads] == [600, 600, 100]
    assert {u["model"] for u in uploads} == {"whisper-1"} and all(u["filename"].endswith(".mp3") for u in uploads)
    assert uploads[0]["authorization"] == "Bearer sk-audio" and uploads[0]["path"] == "/v1/audio/transcriptions"
    data = node_data(app_db_url, node_id)
    assert data["text"] == "whisper-1: 600 s of audio\nwhisper-1: 600 s of audio\nwhisper-1: 100 s of audio"
    assert data["previewResponses"] == ["earlier", data["text"]] and data["executionStatus"] == "COMPLETED"
    row = execution(app_db_url, run.exec_id)
    assert (row.outputType, row.metadata_["segments"], row.metadata_["sourceBytes"]) == ("text", 3, len(long_mp3))


def test_small_file_is_sent_as_it_is_to_groq_and_5xx_is_retried(transcription_api, files, short_mp3,
                                                                   sqlite_app_db_url):
    url = sqlite_app_db_url
    transcription_api.failures = [503]
    files.files["/clip.mp3"] = short_mp3
    run, node_id = run_node(url, {"inputPreview": f"{files.url}/clip.mp3", "aiModel": "groq_v3_turbo"},
                            llm=_llm(transcription_api))
    assert run.result.success
    [upload] = transcription_api.uploads
    assert (upload["path"], upload["model"], upload["bytes"], upload["filename"]) == (
        "/openai/v1/audio/transcriptions", "whisper-large-v3-turbo", len(short_mp3), "audio.mp3")
    assert upload["authorization"] == "Bearer gsk-audio"
    assert node_data(url, node_id)["text"] == "whisper-large-v3-turbo: 5 s of audio"


def test_youtube_transcript_from_searchapi(app_db_url):
    with FakeSearchApi() as search:
        search.transcripts["dQw4w9WgXcQ"] = ["Never gonna", "give you up"]
        media = MediaApisResource(search_api_key=search.api_key, search_api_base_url=f"{search.url}/api/v1")
        run, node_id = run_node(app_db_url, {"type": "ytTranscript", "youtubeUrl": "https://youtu.be/dQw4w9WgXcQ"},
                                media_apis=media)
        assert run.result.success
        assert node_data(app_db_url, node_id)["text"] == "Never gonna give you up"
        missing, missing_id = run_node(app_db_url, {"type": "ytTranscript",
                                                    "youtubeUrlData": [{"text": "https://youtu.be/AAAAAAAAAAA"}]},
                                       media_apis=media)
        assert_failed(app_db_url, missing, missing_id, "No transcript is available for the YouTube video AAAAAAAAAAA")
        bad_key, bad_id = run_node(app_db_url, {"type": "ytTranscript", "youtubeUrl": "dQw4w9WgXcQ"},
                                   media_apis=MediaApisResource(search_api_key="wrong",
                                                                search_api_base_url=f"{search.url}/api/v1"))
        assert_failed(app_db_url, bad_key, bad_id, "SearchAPI request failed (HTTP 401): Invalid API key.")


def test_guard_cap_and_bad_audio_fail_alone(app_db_url, transcription_api, files, monkeypatch):
    files.files["/notes.txt"] = b"these are not sounds"
    files.files["/big.mp3"] = b"\xff\xfb" * 600
    llm = _llm(transcription_api)
    run, node_id = run_node(app_db_url, {"inputPreview": f"{files.url}/notes.txt"}, llm=llm)
    assert_failed(app_db_url, run, node_id, "The file is not audio that ffmpeg can read.")
    monkeypatch.setenv(at.MAX_BYTES_ENV, "1000")
    run, node_id = run_node(app_db_url, {"inputPreview": f"{files.url}/big.mp3"}, llm=llm)
    assert_failed(app_db_url, run, node_id, "The audio file is larger than 1,000 bytes (FLUX_AUDIO_MAX_BYTES).")
    monkeypatch.delenv(at.ALLOWED_HOSTS_ENV)
    run, node_id = run_node(app_db_url, {"inputPreview": f"{files.url}/big.mp3"}, llm=llm)
    assert_failed(app_db_url, run, node_id, "unless FLUX_AUDIO_ALLOWED_HOSTS allows them")
    assert transcription_api.uploads == []


def test_provider_refusal_is_not_retried(app_db_url, transcription_api, files, short_mp3):
    transcription_api.failures = [400]
    files.files["/clip.wav"] = short_mp3
    run, node_id = run_node(app_db_url, {"inputPreview": f"{files.url}/clip.wav"}, llm=_llm(transcription_api))
    assert_failed(app_db_url, run, node_id, "openai request failed (HTTP 400)")
    assert len(transcription_api.requests) == 1


def test_offline_transcript_says_what_it_is(app_db_url, files, short_mp3):
    files.files["/clip.mp3"] = short_mp3
    run, node_id = run_node(app_db_url, {"inputPreview": f"{files.url}/clip.mp3"})
    assert run.result.success
    assert node_data(app_db_url, node_id)["text"].startswith(at.OFFLINE_LABEL)
