"""API caller, math function, counter, SQL querier and image generator: their plain functions, and
each end to end through ``process_single_node`` on SQLite and Postgres, with real clients against
loopback servers (an HTTP API, the openai SDK's images API, the machine's PostgreSQL and MariaDB)."""

import base64
import json
import struct
import uuid
import zlib
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from sqlalchemy import create_engine, select, text

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import TokenLedgerEntry
from flux_dagster.errors import UserConfigError
from flux_dagster.nodes import api_caller as ac
from flux_dagster.nodes import counter, image_generator as ig, math_function as mf, sql_querier as sq
from flux_dagster.nodes.netguard import AllowList, resolve_permitted
from flux_dagster.ops.retries import RETRY_POLICIES
from flux_dagster.resources import LlmResource
from flux_dagster_tests.conftest import add_node, assert_failed, execute_node, execution, make_resources, node_data
from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply

LOOPBACK = "127.0.0.1/32"
MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


def run_node(url, node_type, data, **resource_kw):
    flow_id, node_id = add_node(url, node_type, data)
    return execute_node(url, make_resources(url, **resource_kw), flow_id, node_id), node_id


# ----- math function ---------------------------------------------------------------------------


@pytest.mark.parametrize("formula,expected", [
    ("1 + 2 ^ 3", 9), ("-2^2", -4), ("2^3^2", 512), ("(1 + 2) * 3", 9), ("10 % 3", 1), ("7 / 2", 3.5),
    ("sqrt(16) + max(1, 5, 3) + abs(-1)", 10), ("round(2.5) + floor(1.9) + ceil(0.1)", 5), ("3 > 2", 1),
    ("1 < 2 and 2 < 1", 0), ("2 if 0 else 3", 3), ("PI > 3", 1), ("log(E)", 1),
])
def test_math_evaluator_supports_expr_eval_arithmetic(formula, expected):
    assert mf.as_number(mf.evaluate(formula)) == expected


@pytest.mark.parametrize("formula,message", [
    ("", "empty"), ("1 +", "not valid"), ("x + 1", "Unknown variable or name 'x'"), ("1 / 0", "divides by zero"),
    ("__import__('os').system('id')", "cannot"), ("().__class__.__bases__", "cannot"), ("open('/etc/passwd')", "cannot"),
    ("'a' * 3", "cannot"), ("[1, 2]", "cannot"), ("9 ^ 9 ^ 9", "cannot be computed"), ("sqrt(-1)", "cannot be computed"),
    ("1" + "+1" * 5000, "longer than"), ("(" * 500 + "1" + ")" * 500, "not valid"),
])
def test_math_evaluator_refuses_everything_else_as_a_user_error(formula, message):
    with pytest.raises(UserConfigError, match=message.replace("(", r"\(")):
        mf.evaluate(formula)


def test_math_variables_replace_whole_words_in_order():
    variables = [{"id": "1", "name": "x", "value": -3}, {"id": "2", "name": "xy", "value": "10"},
                 {"id": "3", "name": "rate", "value": "0.5"}]
    assert mf.substitute("x^2 + xy + rate*x", variables) == "(-3)^2 + (10) + (0.5)*(-3)"
    assert mf.compute({"formula": "x^2 + xy + rate*x", "variables": variables}) == 17.5
    assert mf.compute({"formula": "a*b", "variables": [{"name": "a", "value": "b"}, {"name": "b", "value": 4}]}) == 16


def test_math_function_end_to_end(app_db_url):
    run, node_id = run_node(app_db_url, "mathFunction", {"formula": "price * qty * (1 + tax)", "variables": [
        {"id": "a", "name": "price", "value": "12.5"}, {"id": "b", "name": "qty", "value": 4},
        {"id": "c", "name": "tax", "value": "0.2"}]})
    assert run.result.success
    data = node_data(app_db_url, node_id)
    assert (data["result"], data["executionStatus"]) == (60, "COMPLETED")
    assert execution(app_db_url, run.exec_id).outputData == {"result": 60}


def test_math_bad_formula_fails_once_without_retry(app_db_url):
    run, node_id = run_node(app_db_url, "mathFunction", {"formula": "2 * unknown", "variables": []})
    assert_failed(app_db_url, run, node_id, "Unknown variable or name 'unknown'")
    attempts = [e for e in run.result.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert attempts == []


# ----- counter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data,expected", [
    ({"counterMode": "up", "text": "4"}, "5"), ({"counterMode": "down", "text": "4"}, "3"),
    ({"counterMode": "UP"}, "1"), ({"text": "abc"}, "1"), ({"isIncreasing": False, "text": "0"}, "-1"),
    ({"isIncreasing": True, "text": "2.5"}, "3.5"), ({"text": "nan"}, "1"), ({"counterMode": "wait", "text": "kept"}, "kept"),
])
def test_counter_modes(data, expected):
    assert counter.next_text(data) == expected


def test_counter_wait_caps_only_the_edge_value():
    assert counter.wait_seconds({"waitSeconds": 90}) == 90
    assert counter.wait_seconds({"waitSeconds": 5, "waitSecondsData": [{"text": "600"}]}) == 60
    assert counter.wait_seconds({"waitSecondsData": [{"text": "-3"}]}) == 0
    with pytest.raises(UserConfigError, match="not a number"):
        counter.wait_seconds({"waitSeconds": "soon"})
    with pytest.raises(UserConfigError, match="Unknown counter mode"):
        counter.mode_of({"counterMode": "sideways"})


@pytest.mark.parametrize("data,expected", [
    ({"counterMode": "up", "text": "41"}, "42"),
    ({"counterMode": "wait", "text": "same", "waitSecondsData": [{"text": "0.01"}]}, "same"),
])
def test_counter_end_to_end(app_db_url, data, expected):
    run, node_id = run_node(app_db_url, "counterNode", data)
    assert run.result.success
    assert node_data(app_db_url, node_id)["text"] == expected
    assert execution(app_db_url, run.exec_id).output == expected


# ----- network guard ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254",
                                  "100.64.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "fe80::1"])
def test_guard_refuses_non_public_addresses(host):
    with pytest.raises(UserConfigError, match="non-public address"):
        resolve_permitted(host, 80, AllowList.from_env("FLUX_TEST_UNSET_ALLOW_LIST"), "X_ALLOWED", "URL host")


def test_guard_allow_list_takes_cidrs_and_host_names(monkeypatch):
    monkeypatch.setenv("FLUX_TEST_ALLOW", " 10.0.0.0/8 , localhost ")
    allow = AllowList.from_env("FLUX_TEST_ALLOW")
    assert [str(a) for a in resolve_permitted("10.9.9.9", 80, allow, "FLUX_TEST_ALLOW", "URL host")] == ["10.9.9.9"]
    assert all(a.is_loopback for a in resolve_permitted("localhost", 80, allow, "FLUX_TEST_ALLOW", "URL host"))
    with pytest.raises(UserConfigError, match="FLUX_TEST_ALLOW"):
        resolve_permitted("192.168.1.1", 80, allow, "FLUX_TEST_ALLOW", "URL host")
    assert [str(a) for a in resolve_permitted("8.8.8.8", 443, allow, "FLUX_TEST_ALLOW", "URL host")] == ["8.8.8.8"]


# ----- API caller: plain functions -------------------------------------------------------------


def test_api_request_from_node_data():
    request = ac.build_request({
        "method": "post", "urlData": [{"text": "https://api.example.com/items?fixed=1"}], "url": "ignored",
        "queryParams": [{"key": "page", "value": "2"}, {"key": "", "value": "dropped"}],
        "jsonAuth": '{Authorization: "Bearer from-json", "X-Key": "k"}', "username": "ann", "password": "s3cret",
        "jsonRequestBody": "{name: 'x'}".replace("'", '"'),
    })
    assert request.method == "POST"
    assert str(request.url) == "https://api.example.com/items?fixed=1&page=2"
    assert request.headers == {"X-Key": "k", "Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode(),
                               "Content-Type": "application/json"}
    assert json.loads(request.content) == {"name": "x"}
    assert request.verify is True


def test_api_request_form_body_raw_text_and_certificate_flag():
    form = ac.build_request({"method": "PUT", "url": "http://h/", "contentType": "application/x-www-form-urlencoded",
                             "formDataParams": [{"key": "a", "value": "1 2"}, {"key": "b", "value": "&"}],
                             "validateCertificate": False})
    assert (form.content, form.headers["Content-Type"], form.verify) == (
        b"a=1+2&b=%26", "application/x-www-form-urlencoded", False)
    raw = ac.build_request({"method": "POST", "url": "http://h/", "contentType": "text/plain",
                            "jsonRequestBody": "not {json"})
    assert raw.content == b"not {json"
    assert ac.build_request({"url": "http://h/", "jsonRequestBody": "{}"}).content is None  # GET has no body


@pytest.mark.parametrize("data,message", [
    ({"url": ""}, "URL is empty"), ({"url": "ftp://h/x"}, "http:// or https://"), ({"url": "h/x"}, "http://"),
    ({"url": "http://h/", "method": "TRACE"}, "Unsupported HTTP method"),
    ({"url": "http://h/", "method": "POST", "jsonRequestBody": "{broken"}, "jsonRequestBody is not valid JSON"),
    ({"url": "http://h/", "jsonAuth": "[1]"}, "jsonAuth must be a JSON object"),
    ({"url": "http://h/", "jsonAuth": {"Bad Name": "x"}}, "not a valid HTTP header"),
    ({"url": "http://h/", "jsonAuth": {"X-Note": "a\r\nInjected: 1"}}, "not a valid HTTP header"),
])
def test_api_request_mistakes_are_user_errors(data, message):
    with pytest.raises(UserConfigError, match=message):
        ac.build_request(data)


def test_output_filter_structured_raw_and_shape_change():
    body = json.dumps({"data": {"items": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "total": 2}})
    structured = {"selectedPaths": ["data.total", "data.items[1].name", "data.items[*].id"], "mode": "structured"}
    filtered, kept = ac.apply_output_filter(body, structured)
    assert json.loads(filtered) == {"data.total": 2, "data.items[1].name": "b", "data.items[*].id": [1, 2]}
    assert kept is structured and filtered.startswith("{\n  ")
    assert ac.apply_output_filter(body, {"selectedPaths": ["data.items.0.name", "data.total"], "mode": "raw"})[0] == "a\n2"
    assert ac.apply_output_filter(body, {"selectedPaths": ["data.gone"], "mode": "raw"}) == (body, None)
    assert ac.apply_output_filter("plain text", {"selectedPaths": ["a"]}) == ("plain text", None)
    assert ac.apply_output_filter(body, None) == (body, None)


def test_polling_condition():
    polling = ac.Polling.from_data({"pollingEnabled": True, "pollingConditionField": "job.state",
                                    "pollingConditionMatch": "^(queued|running)$"})
    assert (polling.interval_s, polling.duration_s) == (5.0, 60.0)
    assert polling.keep_polling(ac.ApiResponse(200, '{"job": {"state": "running"}}', False))
    assert not polling.keep_polling(ac.ApiResponse(200, '{"job": {"state": "done"}}', False))
    assert not polling.keep_polling(ac.ApiResponse(200, '{"other": 1}', False))
    assert polling.keep_polling(ac.ApiResponse(503, "busy", False))
    assert not polling.keep_polling(ac.ApiResponse(404, "nope", False))
    whole_body = ac.Polling.from_data({"pollingEnabled": True, "pollingConditionMatch": "pending"})
    assert whole_body.keep_polling(ac.ApiResponse(200, "still pending", False))
    with pytest.raises(UserConfigError, match="regular expression"):
        ac.Polling.from_data({"pollingConditionMatch": "("})


class FakeApi(LoopbackServer):
    """``routes`` maps a path to a list of replies, answered in turn (the last one repeats)."""

    def __init__(self):
        self.routes: dict[str, list[Reply]] = {}
        super().__init__(self._handle)

    def _handle(self, req: Recorded) -> Reply:
        replies = self.routes.get(urlparse(req.path).path) or [Reply(404, {"error": "no route"})]
        return replies.pop(0) if len(replies) > 1 else replies[0]

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if urlparse(r.path).path == path]


@pytest.fixture
def api():
    with FakeApi() as server:
        yield server


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(ac.ALLOWED_HOSTS_ENV, LOOPBACK)


def _send(api, path, **data):
    request = ac.build_request({"url": f"{api.url}{path}", **data})
    with ac.http_client(True) as client:
        return ac.send(client, request, AllowList.from_env(ac.ALLOWED_HOSTS_ENV), 1_000_000)


def test_redirects_are_followed_and_checked_again(api, allow_loopback):
    api.routes["/start"] = [Reply(302, {}, headers={"location": "/final"})]
    api.routes["/final"] = [Reply(200, {"ok": True})]
    assert _send(api, "/start", jsonAuth={"Authorization": "Bearer t"}).text == '{"ok": true}'
    assert [c.path for c in api.requests] == ["/start", "/final"]
    assert api.requests[1].headers["authorization"] == "Bearer t"  # same origin keeps credentials

    api.routes["/metadata"] = [Reply(302, {}, headers={"location": "http://169.254.169.254/latest/meta-data/"})]
    with pytest.raises(UserConfigError, match="169.254.169.254"):
        _send(api, "/metadata")


def test_response_size_is_capped(api, allow_loopback):
    api.routes["/big"] = [Reply(200, b"x" * 5000, headers={"content-type": "text/plain"})]
    response = _send(api, "/big")
    assert response.text == "x" * 5000 and not response.truncated
    request = ac.build_request({"url": f"{api.url}/big"})
    with ac.http_client(True) as client:
        capped = ac.send(client, request, AllowList.from_env(ac.ALLOWED_HOSTS_ENV), 100)
    assert (len(capped.text), capped.truncated) == (100, True)


def _tls_files(tmp_path: Path, name: str) -> tuple[str, Path, Path]:
    """(CA PEM, leaf certificate file, key file): a throwaway CA and a leaf certificate for ``name``."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)

    def cert(subject, issuer, public_key, signing_key, *, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True).add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flux test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, leaf_key.public_key(), ca_key,
                ca=False, san=name)
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return ca_cert.public_bytes(serialization.Encoding.PEM).decode(), cert_file, key_file


def test_tls_still_verifies_the_host_name_while_the_address_is_pinned(monkeypatch, tmp_path):
    import ssl

    monkeypatch.setenv(ac.ALLOWED_HOSTS_ENV, "127.0.0.1/32,localhost")
    ca_pem, cert_file, key_file = _tls_files(tmp_path, "localhost")
    server = FakeApi()
    server.routes["/hello"] = [Reply(200, {"tls": True})]
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    server.server.socket = server_context.wrap_socket(server.server.socket, server_side=True)
    server.server.handle_error = lambda *_: None  # the refused handshake below is expected, not news
    allow = AllowList.from_env(ac.ALLOWED_HOSTS_ENV)
    with server, ac.http_client(ssl.create_default_context(cadata=ca_pem)) as client:
        port = server.server.server_address[1]
        response = ac.send(client, ac.build_request({"url": f"https://localhost:{port}/hello"}), allow, 1000)
        assert (response.status, response.text) == (200, '{"tls": true}')
        assert server.requests[0].headers["host"] == f"localhost:{port}"
        # Same server, but the URL names an address the certificate does not carry.
        with pytest.raises(UserConfigError, match="certificate of 127.0.0.1 could not be verified"):
            ac.send(client, ac.build_request({"url": f"https://127.0.0.1:{port}/hello"}), allow, 1000)


# ----- API caller: end to end ------------------------------------------------------------------


def test_api_caller_success_end_to_end(app_db_url, api, allow_loopback):
    api.routes["/v1/orders"] = [Reply(201, {"order": {"id": "o-1", "lines": [{"sku": "A"}, {"sku": "B"}]}})]
    run, node_id = run_node(app_db_url, "apiCaller", {
        "method": "POST", "url": f"{api.url}/v1/orders", "queryParams": [{"key": "dry", "value": "no"}],
        "jsonAuth": {"X-Api-Key": "k-1"}, "jsonRequestBodyData": [{"text": '{qty: 2}'}],
        "outputFilter": {"selectedPaths": ["order.id", "order.lines[*].sku"], "mode": "raw", "schemaHash": "h"},
    })
    assert run.result.success
    [call] = api.requests
    assert (call.method, call.path, call.body) == ("POST", "/v1/orders?dry=no", {"qty": 2})
    assert call.headers["x-api-key"] == "k-1" and call.headers["host"] == api.url.split("//")[1]
    data = node_data(app_db_url, node_id)
    assert json.loads(data["text"]) == {"order": {"id": "o-1", "lines": [{"sku": "A"}, {"sku": "B"}]}}
    assert data["filteredText"] == 'o-1\n["A", "B"]'
    assert (data["pollingCallCount"], data["executionStatus"], data["errorMessage"]) == (1, "COMPLETED", None)
    assert execution(app_db_url, run.exec_id).outputType == "json"


def test_api_caller_404_is_a_user_error_not_retried(app_db_url, api, allow_loopback):
    api.routes["/missing"] = [Reply(404, {"error": "no such thing"})]
    run, node_id = run_node(app_db_url, "apiCaller", {"url": f"{api.url}/missing"})
    data = assert_failed(app_db_url, run, node_id, 'HTTP 404: {"error": "no such thing"}')
    assert len(api.requests) == 1
    assert data["errorStatusCode"] == 404 and data["text"] == '{"error": "no such thing"}'


def test_api_caller_500_is_retried_then_fails(app_db_url, api, allow_loopback):
    api.routes["/flaky"] = [Reply(500, {"error": "boom"})]
    run, node_id = run_node(app_db_url, "apiCaller", {"url": f"{api.url}/flaky"})
    assert_failed(app_db_url, run, node_id, "HTTP 500")
    assert len(api.requests) == RETRY_POLICIES["api_caller"].max_retries + 1


def test_api_caller_post_answered_500_is_not_repeated(app_db_url, api, allow_loopback):
    """A POST may have taken effect on the user's system: one attempt, as the original makes."""
    api.routes["/v1/orders"] = [Reply(500, {"error": "boom"})] * 5
    run, node_id = run_node(app_db_url, "apiCaller", {"method": "POST", "url": f"{api.url}/v1/orders",
                                                      "jsonRequestBody": '{"qty": 1}'})
    assert_failed(app_db_url, run, node_id, "HTTP 500")
    assert len(api.requests) == 1


def test_api_caller_retry_recovers(app_db_url, api, allow_loopback):
    api.routes["/flaky"] = [Reply(429, {"error": "slow down"}), Reply(200, {"ok": 1})]
    run, node_id = run_node(app_db_url, "apiCaller", {"url": f"{api.url}/flaky"})
    assert run.result.success and len(api.requests) == 2
    data = node_data(app_db_url, node_id)
    assert (data["text"], data["errorMessage"], data["errorStatusCode"]) == ('{"ok": 1}', None, None)


def test_api_caller_refuses_loopback_without_the_allow_list(app_db_url, api, monkeypatch):
    monkeypatch.delenv(ac.ALLOWED_HOSTS_ENV, raising=False)
    api.routes["/secret"] = [Reply(200, {"secret": True})]
    run, node_id = run_node(app_db_url, "apiCaller", {"url": f"{api.url}/secret"})
    assert_failed(app_db_url, run, node_id, "non-public address 127.0.0.1")
    assert api.requests == []


def test_api_caller_polls_until_the_condition_clears(app_db_url, api, allow_loopback):
    api.routes["/job"] = [Reply(200, {"status": "queued"}), Reply(503, "busy"), Reply(200, {"status": "running"}),
                          Reply(200, {"status": "done", "result": 7})]
    run, node_id = run_node(app_db_url, "apiCaller", {
        "url": f"{api.url}/job", "pollingEnabled": True, "pollingInterval": 0, "pollingRetryDuration": 30,
        "pollingConditionField": "status", "pollingConditionMatch": "queued|running"})
    assert run.result.success
    data = node_data(app_db_url, node_id)
    assert data["pollingCallCount"] == 4 and json.loads(data["text"])["result"] == 7


def test_polling_gives_up_when_its_budget_is_spent(monkeypatch):
    monkeypatch.setattr(ac, "send", lambda *_args: ac.ApiResponse(200, '{"status": "queued"}', False))
    ticks = iter(range(0, 1000, 2))  # every clock reading is 2 s later than the one before
    polling = ac.Polling.from_data({"pollingEnabled": True, "pollingInterval": 2, "pollingRetryDuration": 10,
                                    "pollingConditionField": "status", "pollingConditionMatch": "queued"})
    slept = []
    response, calls, gave_up = ac.call(None, None, polling, allow=None, max_bytes=1, sleep=slept.append,
                                       clock=lambda: next(ticks))
    assert gave_up and response.status == 200
    assert calls == len(slept) + 1 and slept == [2.0] * len(slept)


def test_api_caller_polling_timeout_fails_without_retry(app_db_url, api, allow_loopback):
    api.routes["/job"] = [Reply(200, {"status": "queued"})]
    run, node_id = run_node(app_db_url, "apiCaller", {
        "url": f"{api.url}/job", "pollingEnabled": True, "pollingInterval": 0, "pollingRetryDuration": 0,
        "pollingConditionField": "status", "pollingConditionMatch": "queued"})
    data = assert_failed(app_db_url, run, node_id, "Polling gave up")
    assert data["pollingCallCount"] == len(api.requests)
    assert not [e for e in run.result.all_events if e.event_type_value == "STEP_RESTARTED"]


# ----- SQL querier -----------------------------------------------------------------------------


@pytest.mark.parametrize("dbms", ["mongodb", "sqlserver", "firebase", "oracle", ""])
def test_sql_other_databases_are_not_supported(dbms):
    with pytest.raises(UserConfigError, match="not supported by this worker"):
        sq.target_of({"dbms": dbms, "host": "db.example.com"})


def test_sql_rows_serialise_dates_decimals_and_bytes():
    from datetime import date, datetime, timedelta, timezone
    from decimal import Decimal

    rows = [{"d": date(2024, 1, 2), "ts": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "n": Decimal("1.50"),
             "t": timedelta(hours=26, minutes=3, seconds=4), "b": b"\x00\x01", "u": uuid.UUID(int=1), "s": "é"}]
    assert json.loads(sq.rows_json(rows)) == [{
        "d": "2024-01-02", "ts": "2024-01-02T03:04:05+00:00", "n": "1.50", "t": "26:03:04", "b": "AAE=",
        "u": "00000000-0000-0000-0000-000000000001", "s": "é"}]
    assert sq.rows_json([{"a": 1}]) == '[\n  {\n    "a": 1\n  }\n]'


@pytest.fixture
def allow_loopback_sql(monkeypatch):
    monkeypatch.setenv(sq.ALLOWED_HOSTS_ENV, LOOPBACK)


PG_NODE = {"dbms": "postgresql", "host": "127.0.0.1", "port": 5432, "username": "postgres", "password": "",
           "database": "postgres", "ssl": False}


def test_sql_postgres_end_to_end(app_db_url, allow_loopback_sql):
    query = ("SELECT n AS id, 'row ' || n AS label, n * 1.25::numeric AS amount, DATE '2024-02-29' + n AS day, "
             "'50%' AS pct FROM generate_series(1, 2) AS n ORDER BY n")
    run, node_id = run_node(app_db_url, "sqlQuerier", {**PG_NODE, "query": "SELECT 'static'", "queryData": [{"text": query}]})
    assert run.result.success
    text_out = node_data(app_db_url, node_id)["text"]
    assert json.loads(text_out) == [
        {"id": 1, "label": "row 1", "amount": "1.25", "day": "2024-03-01", "pct": "50%"},
        {"id": 2, "label": "row 2", "amount": "2.50", "day": "2024-03-02", "pct": "50%"}]
    assert text_out.startswith('[\n  {\n    "id": 1,')


@pytest.fixture
def mariadb_table():
    name = f"flux_sql_{uuid.uuid4().hex[:8]}"
    engine = create_engine(MARIADB_URL)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id INT PRIMARY KEY, name VARCHAR(40), price DECIMAL(8,2), "
                          "created DATETIME, at_time TIME)"))
        conn.execute(text(f"INSERT INTO {name} VALUES (1, 'pen', 1.50, '2024-05-06 07:08:09', '12:30:00'), "
                          "(2, 'café', 10.00, '2024-05-07 00:00:00', '01:02:03')"))
    yield name
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


def test_sql_mariadb_end_to_end(app_db_url, allow_loopback_sql, mariadb_table):
    run, node_id = run_node(app_db_url, "sqlQuerier", {
        "dbms": "MySQL", "host": "127.0.0.1", "port": "3306", "username": "root", "password": "", "database": "test",
        "query": f"SELECT id, name, price, created, at_time FROM {mariadb_table} WHERE name LIKE '%a%' ORDER BY id"})
    assert run.result.success
    assert json.loads(node_data(app_db_url, node_id)["text"]) == [
        {"id": 2, "name": "café", "price": "10.00", "created": "2024-05-07T00:00:00", "at_time": "01:02:03"}]


def test_sql_failures_are_clear(app_db_url, allow_loopback_sql):
    run, node_id = run_node(app_db_url, "sqlQuerier", {**PG_NODE, "query": "SELECT * FROM no_such_table"})
    assert_failed(app_db_url, run, node_id, 'relation "no_such_table" does not exist')
    run, node_id = run_node(app_db_url, "sqlQuerier", {**PG_NODE, "dbms": "mongodb", "query": "{}"})
    assert_failed(app_db_url, run, node_id, "'mongodb' is not supported by this worker")


def test_sql_refuses_loopback_without_the_allow_list(monkeypatch):
    monkeypatch.delenv(sq.ALLOWED_HOSTS_ENV, raising=False)
    with pytest.raises(UserConfigError, match="FLUX_SQLQUERIER_ALLOWED_HOSTS"):
        sq.run_query(sq.target_of(PG_NODE), "SELECT 1", AllowList.from_env(sq.ALLOWED_HOSTS_ENV))


# ----- image generator -------------------------------------------------------------------------


def _png_size(content: bytes) -> tuple[int, int]:
    assert content.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", content[16:24])


def test_image_prompt_and_size():
    data = {"prompt": "A lighthouse", "promptData": [{"text": "at dusk"}], "style": "ignored when a preset is set",
            "style_present": "Watercolor", "viewData": [{"text": "aerial"}], "subject": "gulls", "tone": "calm"}
    assert ig.build_prompt(data) == ("at dusk\nA lighthouse\nStyle: Watercolor\nView: aerial\nSubject: gulls\n"
                                     "Tone: calm")
    assert "Style: ink" in ig.build_prompt({"prompt": "x", "style": "ink", "style_present": "None"})
    assert ig.size_for("dall-e-3", "16:9") == "1792x1024"
    assert ig.size_for("gpt-image-1", "9:16") == "1024x1536"
    assert ig.size_for("dall-e-2", "16:9") == ig.size_for("dall-e-3", "odd") == "1024x1024"
    with pytest.raises(UserConfigError, match="prompt is empty"):
        ig.build_prompt({"tone": ""})


@pytest.mark.parametrize("ai_system,message", [("meta", "not supported by this worker"),
                                               ("dreamstudio", "not supported by this worker"),
                                               ("opensources", "has been removed")])
def test_image_other_providers_are_user_errors(ai_system, message):
    with pytest.raises(UserConfigError, match=message):
        ig.image_spec({"aiSystem": ai_system, "prompt": "x"})


def test_offline_placeholder_is_a_deterministic_labelled_png():
    spec = ig.ImageSpec(model="dall-e-3", prompt="a cat", size="1024x1024")
    content = ig.placeholder_png(spec)
    assert content == ig.placeholder_png(spec) != ig.placeholder_png(ig.ImageSpec("dall-e-3", "a dog", "1024x1024"))
    width, height = _png_size(content)
    assert b"offline placeholder" in content
    idat = content[content.index(b"IDAT") + 4: content.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


class FakeImagesApi(LoopbackServer):
    """OpenAI's ``POST /v1/images/generations`` with ``b64_json`` answers."""

    def __init__(self):
        self.failures: list[int] = []
        self.image = ig.placeholder_png(ig.ImageSpec("fake", "fake", "1x1"), word="FILE")
        super().__init__(self._handle)

    def _handle(self, req: Recorded) -> Reply:
        if req.path != "/v1/images/generations":
            return Reply(404, {"error": {"message": "no route"}})
        if self.failures:
            status = self.failures.pop(0)
            return Reply(status, {"error": {"message": f"fake {status}", "type": "fake", "code": str(status)}})
        return Reply(200, {"created": 1, "data": [{"b64_json": base64.b64encode(self.image).decode(),
                                                   "revised_prompt": req.body["prompt"]}]})

    def generations(self):
        return [r for r in self.requests if r.path == "/v1/images/generations"]


@pytest.fixture
def images_api():
    with FakeImagesApi() as server:
        yield server


def _openai_llm(server) -> LlmResource:
    return LlmResource(offline=False, openai_api_key="sk-images", openai_base_url=f"{server.url}/v1", timeout_s=10)


IMAGE_NODE = {"aiSystem": "openai", "aiModel": "dall-e-3", "prompt": "A red kite", "aspectRatio": "16:9",
              "label": "Kite", "previewResponses": [f"old-{i}" for i in range(10)], "nodeUsedTokens": 4}


def test_image_generator_end_to_end_charges_once(app_db_url, images_api, fake_main_api, tmp_path):
    from flux_dagster.files.resource import FileStoreResource

    fake_main_api.charge_failures = [502]  # the charge step is retried; the image is not generated again
    run, node_id = run_node(app_db_url, "imageGenerator", IMAGE_NODE, llm=_openai_llm(images_api),
                            main_api=fake_main_api, file_store=FileStoreResource(local_root=str(tmp_path)))
    assert run.result.success
    [call] = images_api.generations()
    assert call.headers["authorization"] == "Bearer sk-images"
    assert call.body == {"model": "dall-e-3", "prompt": "A red kite", "n": 1, "size": "1792x1024",
                         "response_format": "b64_json"}

    data = node_data(app_db_url, node_id)
    link = data["text"]
    assert Path(unquote(urlparse(link).path)).read_bytes() == images_api.image
    assert data["previewResponses"] == [*(f"old-{i}" for i in range(1, 10)), link]
    assert (data["previewIndex"], data["nodeUsedTokens"], data["executionStatus"]) == (9, 5, "COMPLETED")
    assert execution(app_db_url, run.exec_id).outputType == "image"

    charges = fake_main_api.calls("/worker/charge-tokens")
    assert len(charges) == 2 and len({c.body["idempotencyKey"] for c in charges}) == 1
    [charged] = fake_main_api.charges.values()
    assert (charged["usedTokens"], charged["model"], charged["execId"]) == (1, "dall-e-3", run.exec_id)


def test_image_provider_refusal_is_not_retried_nor_charged(app_db_url, images_api):
    images_api.failures = [400]
    run, node_id = run_node(app_db_url, "imageGenerator", IMAGE_NODE, llm=_openai_llm(images_api))
    assert_failed(app_db_url, run, node_id, "HTTP 400")
    assert len(images_api.generations()) == 1
    with session_scope(app_db_url) as s:
        assert s.scalars(select(TokenLedgerEntry).where(TokenLedgerEntry.exec_id == run.exec_id)).all() == []


def test_image_generator_offline_placeholder_and_local_ledger(app_db_url):
    run, node_id = run_node(app_db_url, "imageGenerator", {"prompt": "A quiet harbour"})
    assert run.result.success
    link = node_data(app_db_url, node_id)["text"]
    content = Path(unquote(urlparse(link).path)).read_bytes()
    assert b"offline placeholder" in content and link.endswith("/image.png")
    with session_scope(app_db_url) as s:
        [entry] = s.scalars(select(TokenLedgerEntry).where(TokenLedgerEntry.exec_id == run.exec_id)).all()
        assert (entry.state, entry.output_tokens, entry.model) == ("charged", 1, "dall-e-3")


# ----- node types this worker leaves out --------------------------------------------------------


@pytest.mark.parametrize("node_type", ["audioTranscriber", "commandContentNode"])
def test_left_out_node_types_fail_as_not_supported(app_db_url, node_type):
    run, node_id = run_node(app_db_url, node_type, {"prompt": "x"})
    assert_failed(app_db_url, run, node_id, f"Node type '{node_type}' is not supported by this worker")
