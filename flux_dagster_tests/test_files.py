"""Generated files: the renderers, the local and S3 stores (boto3 against moto's S3 server on
loopback), and the text generator's and display box's files end to end through
``process_single_node`` on SQLite and Postgres."""

import csv
import io
import json
import socket
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import docx
import httpx
import pypdf
import pytest

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import GeneratedFile, NodeExecution, PendingExecution
from flux_dagster.errors import IntegrationError, SystemError_, UserConfigError
from flux_dagster.execution import ExecutionRequest, NodeOutcome, load_node
from flux_dagster.files import render as render_module
from flux_dagster.files.render import key_segment, normalize_file_type, render, safe_name
from flux_dagster.files.resource import FileStoreResource
from flux_dagster.files.store import LocalFileStore, S3FileStore
from flux_dagster.nodes.display_box import run_display_box
from flux_dagster.nodes.files import save_output_file
from flux_dagster.ops.retries import RETRY_POLICIES
from flux_dagster_tests.conftest import add_node, execute_node, make_resources, node_data, rows
from flux_dagster_tests.fakes.http import LoopbackServer, Reply

MARKDOWN = "# Report — Ωμέγα\n\nПривет, **world** ünïcödé.\n\n- first\n- second\n\n1. one\n\n```\ncode → here\n```\n"
TEXT_NODE = {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": "Write a report.", "label": "Writer"}
BUCKET = "flux-files"
S3_KEYS = dict(access_key_id="testing", secret_access_key="testing", region="us-east-1")


def pdf_text(content: bytes) -> str:
    assert content.startswith(b"%PDF-")
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(content)).pages)


def file_path(src: str) -> Path:
    assert src.startswith("file://")
    return Path(url2pathname(urlparse(src).path))


def step_events(run, event_type: str, step_key: str) -> list:
    return [e for e in run.result.all_events if e.event_type_value == event_type and e.step_key == step_key]


# --- renderers ---------------------------------------------------------------------------------


def test_txt_and_md_keep_the_text_as_utf8():
    for file_type in ("txt", "md"):
        rendered = render(MARKDOWN, file_type, title="r")
        assert rendered.content.decode("utf-8") == MARKDOWN
        assert rendered.content_type.endswith("charset=utf-8")


@pytest.mark.parametrize("text, expected", [
    ('{"a": [1, 2]}', {"a": [1, 2]}),
    ('```json\n{"a": 1}\n```', {"a": 1}),  # an LLM's fenced answer is unwrapped
    ("plain words, not JSON", "plain words, not JSON"),
    ("NaN", "NaN"),  # Python's json accepts it; JSON does not
])
def test_json_is_always_valid_json(text, expected):
    content = render(text, "json", title="r").content
    assert json.loads(content) == expected


def test_csv_keeps_a_table_and_puts_prose_in_one_column():
    table = "name,score\nada,3\n\"lovelace, a\",4\n"
    assert render(table, "csv", title="r").content.decode() == table
    prose = "Hello, world\n\nsecond line"
    assert list(csv.reader(io.StringIO(render(prose, "csv", title="r").content.decode()))) == [
        ["Hello, world"], ["second line"]]


def test_html_renders_markdown_in_a_page():
    page = render(MARKDOWN + "\n| a | b |\n|---|---|\n| 1 | 2 |\n", "html", title="<R&D>").content.decode()
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "<title>&lt;R&amp;D&gt;</title>" in page
    assert "<h1>Report — Ωμέγα</h1>" in page and "<strong>world</strong>" in page and "<table>" in page
    document = "<!doctype html><html><body>mine</body></html>"
    assert render(document, "html", title="r").content.decode() == document


def test_pdf_prints_non_latin_text_with_the_dejavu_font():
    assert render_module.unicode_font_dir() is not None, "fonts-dejavu-core is expected on this machine"
    content = render(MARKDOWN, "pdf", title="Report").content
    text = pdf_text(content)
    for expected in ("Report — Ωμέγα", "Привет", "ünïcödé", "code → here"):
        assert expected in text
    assert "**" not in text and "# " not in text  # laid out as markdown, not printed raw
    fonts = {font["/BaseFont"] for page in pypdf.PdfReader(io.BytesIO(content)).pages
             for font in page["/Resources"]["/Font"].values()}
    assert any("DejaVuSans" in str(f) for f in fonts)


def test_pdf_never_fetches_images_or_reads_local_files():
    with LoopbackServer(lambda req: Reply(200, b"GIF89a")) as server:
        text = f"![x]({server.url}/a.gif)\n\n<img src=\"{server.url}/b.gif\">\n\n<img src=\"/etc/hostname\">"
        content = render(text, "pdf", title="r").content
    assert content.startswith(b"%PDF-")
    assert server.requests == []


def test_pdf_without_unicode_fonts_falls_back_to_latin1(monkeypatch):
    monkeypatch.setattr(render_module, "unicode_font_dir", lambda: None)
    text = pdf_text(render("Héllo “Привет” — ő", "pdf", title="r").content)
    assert 'Héllo "??????" - o' in text


def test_pdf_lays_out_plain_text_when_the_markdown_cannot_be():
    # fpdf2 refuses links to anchors it never saw (a markdown table of contents): the text still
    # gets its PDF.
    text = "See [the summary](#summary).\n\n## Summary\nDone."
    assert "[the summary](#summary)" in pdf_text(render(text, "pdf", title="r").content)


def test_docx_maps_markdown_structure():
    content = render(MARKDOWN + "tail\x00with control\x07 chars", "docx", title="Report").content
    document = docx.Document(io.BytesIO(content))
    paragraphs = [(p.style.name, p.text) for p in document.paragraphs]
    assert paragraphs == [
        ("Heading 1", "Report — Ωμέγα"),
        ("Normal", "Привет, world ünïcödé."),
        ("List Bullet", "first"), ("List Bullet", "second"),
        ("List Number", "one"),
        ("Normal", "code → here"),
        ("Normal", "tailwith control chars"),
    ]
    assert [r.text for r in document.paragraphs[1].runs if r.bold] == ["world"]
    assert document.core_properties.title == "Report"


@pytest.mark.parametrize("value, expected", [("PDF", "pdf"), (".docx", "docx"), (" md ", "md")])
def test_file_types_are_normalised(value, expected):
    assert normalize_file_type(value) == expected


@pytest.mark.parametrize("value", ["exe", "", None, "pdf.exe"])
def test_unsupported_file_type_is_a_user_error(value):
    with pytest.raises(UserConfigError) as info:
        normalize_file_type(value, "fileExtension")
    assert info.value.field == "fileExtension" and not info.value.retryable


def test_file_names_are_sanitised():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("My Report.PDF", "pdf") == "My_Report"
    assert safe_name("报告 2024") == "报告_2024"
    assert safe_name("...") == "" and safe_name(None) == ""
    assert key_segment("a/../b") == "a_.._b" and key_segment("") == "_"


# --- stores ------------------------------------------------------------------------------------


def test_local_store_overwrites_the_same_key(tmp_path):
    store = LocalFileStore(tmp_path)
    first = store.save("generated/f/n/e/a.txt", b"one", content_type="text/plain", download_name="a.txt")
    second = store.save("generated/f/n/e/a.txt", b"two", content_type="text/plain", download_name="a.txt")
    assert first == second and first.key == "generated/f/n/e/a.txt"
    assert file_path(first.src).read_bytes() == b"two"
    assert [p.name for p in file_path(first.src).parent.iterdir()] == ["a.txt"]  # no temp file left
    with pytest.raises(SystemError_):
        store.save("../outside.txt", b"x", content_type="text/plain", download_name="x")


@pytest.fixture(scope="module")
def s3_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    S3FileStore(bucket=BUCKET, endpoint_url=url, **S3_KEYS)._client().create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def s3_keys(url: str, prefix: str) -> list[str]:
    listing = S3FileStore(bucket=BUCKET, endpoint_url=url, **S3_KEYS)._client().list_objects_v2(
        Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_s3_store_uploads_and_links_with_presigned_urls(s3_url):
    store = FileStoreResource(bucket=BUCKET, prefix="/tenant-a/", endpoint_url=s3_url, link_expiry_s=600,
                              **S3_KEYS).store()
    first = store.save("generated/f/n/e/rapport é.txt", b"one", content_type="text/plain; charset=utf-8",
                       download_name="rapport é.txt")
    second = store.save("generated/f/n/e/rapport é.txt", b"two", content_type="text/plain; charset=utf-8",
                        download_name="rapport é.txt")
    assert first.key == second.key == "tenant-a/generated/f/n/e/rapport é.txt"
    assert "X-Amz-Expires=600" in second.src
    response = httpx.get(second.src)
    assert response.status_code == 200 and response.content == b"two"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert "filename*=UTF-8''rapport%20%C3%A9.txt" in response.headers["content-disposition"]
    assert s3_keys(s3_url, "tenant-a/") == [first.key]


def test_s3_errors_are_classified(s3_url):
    missing = S3FileStore(bucket="no-such-bucket", endpoint_url=s3_url, **S3_KEYS)
    with pytest.raises(SystemError_):
        missing.save("k.txt", b"x", content_type="text/plain", download_name="k.txt")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(IntegrationError) as info:
        S3FileStore(bucket=BUCKET, endpoint_url=closed, **S3_KEYS).save(
            "k.txt", b"x", content_type="text/plain", download_name="k.txt")
    assert info.value.retryable


def test_resource_picks_s3_only_with_a_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_HOME", str(tmp_path))
    assert isinstance(FileStoreResource().store(), LocalFileStore)
    assert FileStoreResource().store().root == tmp_path / "files"
    assert isinstance(FileStoreResource(bucket=BUCKET).store(), S3FileStore)


def test_file_name_defaults_to_the_node_id(tmp_path):
    from flux_dagster.execution import NodeTask
    from flux_dagster.nodes.files import generate_file

    request = ExecutionRequest(exec_id="exec-1", flow_id="flow-1", user_id="user-1")
    task = NodeTask(request=request, node_id="outputController-7", node_type="outputController", data={})
    ref = generate_file(LocalFileStore(tmp_path), task, text="hi", file_type="TXT")
    assert ref.link["name"] == "outputController-7.txt"
    assert ref.key == "generated/flow-1/outputController-7/exec-1/outputController-7.txt"
    assert file_path(ref.src).read_text() == "hi"


# --- end to end through process_single_node ----------------------------------------------------


def test_text_generator_saves_its_output_as_a_file(app_db_url, tmp_path):
    store = FileStoreResource(local_root=str(tmp_path))
    data = {**TEXT_NODE, "saveOutput": True, "fileType": "pdf", "customFileName": "Quarterly report.pdf"}
    flow_id, node_id = add_node(app_db_url, "commandTextNode", data)
    resources = make_resources(app_db_url, file_store=store)

    run = execute_node(app_db_url, resources, flow_id, node_id)
    assert run.result.success
    data = node_data(app_db_url, node_id)
    link = data["fileLink"]
    assert link["name"] == "Quarterly_report.pdf"
    assert data["fileLinks"] == [link]
    assert data["text"][:40] in pdf_text(file_path(link["src"]).read_bytes())
    [row] = rows(app_db_url, GeneratedFile, nodeId=node_id)
    assert row.storageKey == f"generated/{flow_id}/{node_id}/{run.exec_id}/Quarterly_report.pdf"
    assert (row.src, row.fileType, row.userId, row.execId) == (link["src"], "pdf", "user-1", run.exec_id)
    [execution] = rows(app_db_url, NodeExecution, execId=run.exec_id)
    assert execution.outputData["fileLink"] == link and execution.outputData["text"] == data["text"]

    # The same execution again (a retried or re-executed step): same key, same row, same entry.
    with session_scope(app_db_url) as session:
        request = ExecutionRequest(exec_id=run.exec_id, flow_id=flow_id, user_id="user-1", node_id=node_id)
        task = load_node(session, request, node_id)
    outcome = save_output_file(app_db_url, store.store(), NodeOutcome(task=task, output="Rewritten", message="ok"))
    assert outcome.extra["fileKey"] == row.storageKey
    assert len(rows(app_db_url, GeneratedFile, nodeId=node_id)) == 1
    assert node_data(app_db_url, node_id)["fileLinks"] == [link]
    assert "Rewritten" in pdf_text(file_path(link["src"]).read_bytes())

    # A new execution keeps its own file next to the first one.
    second = execute_node(app_db_url, resources, flow_id, node_id)
    assert second.result.success
    links = node_data(app_db_url, node_id)["fileLinks"]
    assert len(links) == 2 and links[0] == link and links[1]["src"] != link["src"]
    keys = sorted(r.storageKey for r in rows(app_db_url, GeneratedFile, nodeId=node_id))
    assert len(set(keys)) == 2 and any(second.exec_id in k for k in keys)


def test_text_generator_without_save_output_makes_no_file(app_db_url):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", {**TEXT_NODE, "fileType": "pdf"})
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    assert run.result.success
    assert "fileLink" not in node_data(app_db_url, node_id)
    assert rows(app_db_url, GeneratedFile) == []


def test_bad_file_type_is_a_user_error_and_not_retried(app_db_url):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", {**TEXT_NODE, "saveOutput": True, "fileType": "exe"})
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    assert not run.result.success
    assert len(step_events(run, "STEP_FAILURE", "generate_file")) == 1
    assert step_events(run, "STEP_UP_FOR_RETRY", "generate_file") == []
    data = node_data(app_db_url, node_id)
    assert data["executionStatus"] == "FAILED" and "'exe' is not supported" in data["errorMessage"]
    [execution] = rows(app_db_url, NodeExecution, execId=run.exec_id)
    assert execution.isError and execution.metadata_["code"] == "USER_CONFIG_ERROR"
    assert rows(app_db_url, PendingExecution, id=run.pending_id)[0].status == "failed"


def test_display_box_shows_its_input_and_keeps_an_earlier_link(app_db_url):
    earlier = {"src": "https://files.example/old.txt", "name": "old.txt"}
    flow_id, node_id = add_node(app_db_url, "outputController", {
        "text": "stale", "textData": [{"id": "e1", "text": "first"}, {"text": {"n": 1}}, "third"],
        "fileLink": earlier})
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    assert run.result.success
    assert run.result.output_for_node("display_box").output == {"text": 'first\n{"n": 1}\nthird',
                                                                 "fileLink": earlier}
    data = node_data(app_db_url, node_id)
    assert (data["text"], data["fileLink"], data["executionStatus"]) == ('first\n{"n": 1}\nthird', earlier, "COMPLETED")
    assert rows(app_db_url, GeneratedFile) == []


def test_display_box_saves_its_text_to_s3(app_db_url, s3_url):
    store = FileStoreResource(bucket=BUCKET, prefix="e2e", endpoint_url=s3_url, **S3_KEYS)
    flow_id, node_id = add_node(app_db_url, "outputController", {
        "text": MARKDOWN, "saveOutput": True, "fileExtension": ".docx", "customFileName": "Summary"})
    run = execute_node(app_db_url, make_resources(app_db_url, file_store=store), flow_id, node_id)
    assert run.result.success
    data = node_data(app_db_url, node_id)
    link = data["fileLink"]
    assert link["name"] == "Summary.docx" and data["fileLinks"] == [link]
    response = httpx.get(link["src"])
    assert response.status_code == 200
    assert docx.Document(io.BytesIO(response.content)).paragraphs[0].text == "Report — Ωμέγα"
    key = f"e2e/generated/{flow_id}/{node_id}/{run.exec_id}/Summary.docx"
    [row] = rows(app_db_url, GeneratedFile, nodeId=node_id)
    assert row.storageKey == key

    # Re-running the same execution overwrites: one object, one row, one fileLinks entry.
    with session_scope(app_db_url) as session:
        request = ExecutionRequest(exec_id=run.exec_id, flow_id=flow_id, user_id="user-1", node_id=node_id)
        task = load_node(session, request, node_id)
    outcome = run_display_box(app_db_url, store.store(), task)
    assert outcome.output["fileLink"]["name"] == "Summary.docx"
    assert s3_keys(s3_url, f"e2e/generated/{flow_id}/") == [key]
    assert len(rows(app_db_url, GeneratedFile, nodeId=node_id)) == 1
    links = node_data(app_db_url, node_id)["fileLinks"]
    assert len(links) == 1 and links[0]["src"].split("?")[0] == link["src"].split("?")[0]


def test_display_box_with_nothing_to_save_is_a_user_error(app_db_url):
    flow_id, node_id = add_node(app_db_url, "outputController", {"text": "  ", "saveOutput": True})
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    assert not run.result.success
    assert step_events(run, "STEP_UP_FOR_RETRY", "display_box") == []
    assert "no text to save" in node_data(app_db_url, node_id)["errorMessage"]


def test_unreachable_file_store_is_retried_then_fails(tmp_path):
    url = f"sqlite:///{tmp_path / 'app.db'}"
    from flux_dagster.db.engine import create_schema

    create_schema(url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = FileStoreResource(bucket=BUCKET, endpoint_url=closed, **S3_KEYS)
    flow_id, node_id = add_node(url, "outputController", {"text": "hello", "saveOutput": True})
    run = execute_node(url, make_resources(url, file_store=store), flow_id, node_id)
    assert not run.result.success
    retries = RETRY_POLICIES["display_box"].max_retries
    assert len(step_events(run, "STEP_UP_FOR_RETRY", "display_box")) == retries
    assert "could not be reached" in node_data(url, node_id)["errorMessage"]
