"""deliver_run_outputs: the plan rules, each channel against real loopback servers (aiosmtpd SMTP,
a callback receiver that fails on purpose, the machine's Redis for the dedup keys, moto's S3 for
large plans), and the job in-process from a ``delivery`` row to its terminal status."""

from __future__ import annotations

import ipaddress
import json
import logging
import uuid
from datetime import timedelta

import pytest

from flux_dagster import queue
from flux_dagster.db.engine import create_schema, session_scope
from flux_dagster.db.models import ExecutionLog, PendingExecution, StatusNotification
from flux_dagster.delivery.callback import DELIVERY_ID_HEADER, post_callback, retry_after_s
from flux_dagster.delivery.dedup import EmailDedup
from flux_dagster.delivery.email import SmtpSettings, send_email
from flux_dagster.delivery.outcome import DeliveryFailure
from flux_dagster.delivery.plan import DeliveryPlan, Email, parse_plan, plan_key_of, planned_deliveries, read_plan
from flux_dagster.delivery.resource import DeliveryResource
from flux_dagster.delivery.run import EmailDone, callback_withheld, email_once
from flux_dagster.errors import UserConfigError
from flux_dagster.delivery.egress import EgressPolicy
from flux_dagster.ops.retries import RETRY_POLICIES, delivery_retry_delay
from flux_dagster_tests.fakes.callbacks import CallbackReceiver
from flux_dagster_tests.fakes.http import Reply
from flux_dagster_tests.fakes.smtp import FakeSmtp

REDIS_URL = "redis://127.0.0.1:6379/0"
OFF, REPORT, ENFORCE = (EgressPolicy(frozenset(), (), mode) for mode in ("off", "report", "enforce"))


def plan(**fields) -> dict:
    base = {"flowId": f"flow-{uuid.uuid4().hex[:8]}", "runLogProcessId": f"log-{uuid.uuid4().hex[:8]}",
            "runStatus": "finished", "outputNodes": []}
    return {**base, **fields}


def node(node_id="out1", *, email=None, callback=None, ran=True, **extra) -> dict:
    entry = {"nodeId": node_id, "label": f"Output {node_id}", "ran": ran, "output": f"text of {node_id}", **extra}
    if email is not None:
        entry["email"] = {"to": ["ana@example.com"], "subject": "Your run", "text": "Hello", **email}
    if callback is not None:
        entry["callback"] = {"url": callback}
    return entry


# ----- the plan's rules -----------------------------------------------------------------------

def _shape(raw: dict):
    deliveries, api, skipped = planned_deliveries(DeliveryPlan.model_validate(raw))
    return {d.node_id: (d.email is not None, d.callback is not None) for d in deliveries}, api is not None, skipped


def test_finished_run_sends_enabled_emails_and_set_callbacks():
    raw = plan(outputNodes=[node("a", email={}, callback="https://h.example/a"), node("b", email={"enabled": False},
               callback=" "), node("c", callback="https://h.example/c")],
               apiCallback={"url": "https://api.example/cb", "body": {"status": "completed"}})
    assert _shape(raw) == ({"a": (True, True), "c": (False, True)}, True, None)


@pytest.mark.parametrize("status", ["cancelled", "budget_stopped"])
def test_cancelled_or_budget_stopped_run_sends_nothing(status):
    raw = plan(runStatus=status, outputNodes=[node("a", email={}, callback="https://h.example/a")],
               apiCallback={"url": "https://api.example/cb", "body": {}})
    nodes, api, skipped = _shape(raw)
    assert nodes == {} and not api and "nothing is delivered" in skipped


@pytest.mark.parametrize("flag", ["batch", "subFlow"])
def test_batch_and_sub_flow_runs_send_callbacks_but_no_email(flag):
    raw = plan(**{flag: True}, outputNodes=[node("a", email={}, callback="https://h.example/a", batchRow=0),
                                            node("a", email={}, callback="https://h.example/a", batchRow=1)])
    deliveries, _, _ = planned_deliveries(DeliveryPlan.model_validate(raw))
    assert [(d.batch_row, d.email, d.callback is not None) for d in deliveries] == [(0, None, True), (1, None, True)]
    assert deliveries[0].delivery_id("callback") != deliveries[1].delivery_id("callback")
    assert deliveries[0].mapping_key != deliveries[1].mapping_key


def test_failed_run_nodes_that_did_not_run_send_only_emails_with_attachments():
    attachment = {"attachments": [{"name": "r.txt", "url": "https://files.example/r.txt"}]}
    raw = plan(runStatus="failed", outputNodes=[
        node("ran", email={}, callback="https://h.example/ran"),
        node("idle_plain", email={}, callback="https://h.example/x", ran=False),
        node("idle_files", email=attachment, callback="https://h.example/y", ran=False),
    ])
    deliveries, _, _ = planned_deliveries(DeliveryPlan.model_validate(raw))
    shape = {d.node_id: (d.email is not None, d.callback is not None) for d in deliveries}
    assert shape == {"ran": (True, True), "idle_files": (True, False)}
    idle = deliveries[1]
    assert idle.email.text == "" and idle.output is None and idle.email.attachments


def test_malformed_plans_fail_with_a_bounded_message():
    with pytest.raises(UserConfigError) as info:
        parse_plan({"flowId": "f", "runStatus": "exploded", "outputNodes": [{"email": {"to": []}}] * 3000})
    assert "malformed" in info.value.user_message and len(info.value.user_message) <= 2000
    with pytest.raises(UserConfigError):
        plan_key_of({"planKey": "generated/secret.pdf"})
    assert plan_key_of({"planKey": "delivery-plans/p1.json"}) == "delivery-plans/p1.json"
    assert plan_key_of(plan()) is None
    duplicate = plan(outputNodes=[node("a", callback="https://h.example/a")] * 2)
    with pytest.raises(UserConfigError, match="twice"):
        planned_deliveries(DeliveryPlan.model_validate(duplicate))


def test_delivery_ids_are_stable_and_distinct():
    raw = plan(outputNodes=[node("a", email={}, callback="https://h.example/a"), node("b", callback="https://h/b")])
    first, _, _ = planned_deliveries(DeliveryPlan.model_validate(raw))
    again, _, _ = planned_deliveries(DeliveryPlan.model_validate(raw))
    ids = [d.delivery_id(c) for d in first for c in ("email", "callback")]
    assert ids == [d.delivery_id(c) for d in again for c in ("email", "callback")]
    assert len(set(ids)) == 4


def test_retry_delays_double_are_capped_and_honour_retry_after():
    import flux_dagster.ops.retries as retries

    scale = retries._DELAY_SCALE
    delays = [delivery_retry_delay("deliver_callback", n) / scale for n in range(RETRY_POLICIES["deliver_callback"].max_retries)]
    assert delays == [5, 10, 20, 40, 80, 120, 120]
    assert [delivery_retry_delay("deliver_email", n) / scale for n in range(2)] == [30, 60]
    assert delivery_retry_delay("deliver_callback", 0, at_least_s=30) / scale == 30
    assert delivery_retry_delay("deliver_callback", 0, at_least_s=3600) / scale == 120  # capped
    assert retry_after_s("7") == 7 and retry_after_s("soon") is None
    assert 0 <= retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0


# ----- callbacks --------------------------------------------------------------------------------

@pytest.fixture
def receiver():
    with CallbackReceiver() as server:
        yield server


def test_callback_statuses_are_classified(receiver):
    receiver.script["/hook"] = [Reply(503), Reply(429, {}, {"Retry-After": "3"}), Reply(400), Reply(302)]
    outcomes = []
    for _ in range(4):
        with pytest.raises(DeliveryFailure) as info:
            post_callback(f"{receiver.url}/hook", {"x": 1}, "dlv_1", OFF)
        outcomes.append((info.value.code, info.value.retryable, info.value.retry_after_s))
    assert outcomes == [("HTTP_503", True, None), ("HTTP_429", True, 3.0), ("HTTP_400", False, None),
                        ("HTTP_302", False, None)]
    assert post_callback(f"{receiver.url}/hook", {"x": 1}, "dlv_1", OFF) == 200
    assert {r.headers[DELIVERY_ID_HEADER.lower()] for r in receiver.calls("/hook")} == {"dlv_1"}
    assert "/hook" not in str(outcomes) and receiver.calls("/hook")[-1].body == {"x": 1}


def test_callback_redirects_are_followed_through_the_guard(receiver):
    receiver.script["/hook"] = [Reply(307, {}, {"Location": "/moved"})]
    assert post_callback(f"{receiver.url}/hook", {"x": 1}, "dlv_r", OFF) == 200
    [moved] = receiver.calls("/moved")
    assert moved.method == "POST" and moved.body == {"x": 1} and moved.headers["x-fluxprompt-delivery-id"] == "dlv_r"
    receiver.script["/loop"] = [Reply(307, {}, {"Location": "/loop"})] * 6
    with pytest.raises(DeliveryFailure) as info:
        post_callback(f"{receiver.url}/loop", {}, "dlv", OFF)
    assert (info.value.code, info.value.retryable) == ("REDIRECT", False)


def test_callback_to_something_that_is_not_a_url_or_a_closed_port(receiver):
    for value in ("not a url", "ftp://h.example/x", "javascript:alert(1)"):
        with pytest.raises(DeliveryFailure) as info:
            post_callback(value, {}, "dlv", REPORT)
        assert (info.value.code, info.value.retryable) == ("INVALID_URL", False)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/x"
    with pytest.raises(DeliveryFailure) as info:
        post_callback(closed, {}, "dlv", OFF)
    assert (info.value.code, info.value.retryable) == ("CONNECTION", True)


def test_egress_guard_modes(receiver, caplog):
    url = f"{receiver.url}/hook"
    with pytest.raises(DeliveryFailure) as info:
        post_callback(url, {}, "dlv", ENFORCE)
    assert (info.value.code, info.value.retryable) == ("EGRESS_REFUSED", False)
    assert receiver.calls("/hook") == []
    with caplog.at_level(logging.WARNING, logger="flux_dagster.delivery.egress"):
        assert post_callback(url, {}, "dlv", REPORT) == 200
    assert "egress_would_refuse host=127.0.0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flux_dagster.delivery.egress"):
        assert post_callback(url, {}, "dlv", OFF) == 200
        loopback = EgressPolicy(frozenset(), (ipaddress.ip_network("127.0.0.0/8"),), "enforce")
        assert post_callback(url, {}, "dlv", loopback) == 200  # pinned to the checked address
    assert "egress_would_refuse" not in caplog.text and len(receiver.calls("/hook")) == 3


# ----- email ----------------------------------------------------------------------------------

@pytest.fixture
def smtp():
    with FakeSmtp() as server:
        yield server


def smtp_settings(server: FakeSmtp, tmp_path, **overrides) -> SmtpSettings:
    fields = dict(host="127.0.0.1", port=server.port, user=server.user, password=server.password,
                  from_address="FluxPrompt <runs@fluxprompt.test>", outbox_dir=tmp_path / "emails")
    return SmtpSettings(**{**fields, **overrides})


def test_email_with_attachment_arrives_over_smtp(smtp, receiver, tmp_path):
    receiver.files["/files/report.txt"] = b"the report"
    email = Email(to=["ana@example.com"], cc=["bo@example.com"], bcc=["audit@example.com"], subject="Run done",
                  text="Hello Ana", html="<p>Hello Ana</p>",
                  attachments=[{"name": "report.txt", "url": f"{receiver.url}/files/report.txt"}])
    assert send_email(email, smtp_settings(smtp, tmp_path), "dlv_mail", REPORT) == {}
    [received] = smtp.messages
    assert sorted(received.recipients) == ["ana@example.com", "audit@example.com", "bo@example.com"]
    message = received.message
    assert message["Subject"] == "Run done" and message["X-FluxPrompt-Delivery-Id"] == "dlv_mail"
    assert "dlv_mail" in message["Message-ID"]
    assert "Bcc" not in message and message["Cc"] == "bo@example.com"
    assert message.get_body(("plain",)).get_content().strip() == "Hello Ana"
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "report.txt" and attachment.get_content() == "the report"


def test_attachments_missing_or_too_large_fail_without_sending(smtp, receiver, tmp_path, monkeypatch):
    import flux_dagster.delivery.email as email_module

    receiver.files["/files/big.bin"] = b"x" * 5000
    attachments = lambda path: Email(to=["ana@example.com"], attachments=[{"name": "f", "url": f"{receiver.url}{path}"}])  # noqa: E731
    with pytest.raises(DeliveryFailure) as info:
        send_email(attachments("/files/gone.txt"), smtp_settings(smtp, tmp_path), "d", OFF)
    assert (info.value.code, info.value.retryable) == ("ATTACHMENT_HTTP_404", False)
    monkeypatch.setattr(email_module, "MAX_ATTACHMENT_BYTES", 4096)
    with pytest.raises(DeliveryFailure) as info:
        send_email(attachments("/files/big.bin"), smtp_settings(smtp, tmp_path), "d", OFF)
    assert (info.value.code, info.value.retryable) == ("ATTACHMENT_TOO_LARGE", False)
    with pytest.raises(DeliveryFailure) as info:
        send_email(attachments("/files/big.bin"), smtp_settings(smtp, tmp_path), "d", ENFORCE)
    assert info.value.code == "EGRESS_REFUSED"
    assert smtp.messages == []


def test_some_recipients_refused_counts_as_sent_all_refused_fails(smtp, tmp_path):
    smtp.refuse = {"gone@example.com"}
    email = Email(to=["ana@example.com", "gone@example.com"], subject="s", text="t")
    assert send_email(email, smtp_settings(smtp, tmp_path), "d", OFF) == \
        {"gone@example.com": "550"}
    assert [m.recipients for m in smtp.messages] == [["ana@example.com"]]
    with pytest.raises(DeliveryFailure) as info:
        send_email(Email(to=["gone@example.com"]), smtp_settings(smtp, tmp_path), "d", OFF)
    assert (info.value.code, info.value.retryable) == ("SMTP_550", False)


def test_smtp_failures_are_classified(smtp, tmp_path):
    email = Email(to=["ana@example.com"], subject="s", text="t")
    smtp.fail_next = ["451 4.3.0 Try again later", "554 5.7.1 Rejected"]
    codes = []
    for _ in range(2):
        with pytest.raises(DeliveryFailure) as info:
            send_email(email, smtp_settings(smtp, tmp_path), "d", OFF)
        codes.append((info.value.code, info.value.retryable))
    with pytest.raises(DeliveryFailure) as info:
        send_email(email, smtp_settings(smtp, tmp_path, password="wrong"), "d", OFF)
    codes.append((info.value.code, info.value.retryable))
    with pytest.raises(DeliveryFailure) as info:
        send_email(email, smtp_settings(smtp, tmp_path, port=1), "d", OFF)
    codes.append((info.value.code, info.value.retryable))
    assert codes == [("SMTP_451", True), ("SMTP_554", False), ("SMTP_535", False), ("SMTP_CONNECTION", True)]
    assert "ana@example.com" not in str(info.value) and smtp.messages == []


def test_gmail_sender_is_not_supported_and_withholds_the_callback(tmp_path, smtp):
    email = Email(to=["ana@example.com"], sender="gmail")
    with pytest.raises(DeliveryFailure, match="Gmail account is not supported by this worker") as info:
        send_email(email, smtp_settings(smtp, tmp_path), "d", OFF)
    assert not info.value.retryable
    raw = plan(outputNodes=[node("a", email={"sender": "gmail"}, callback="https://h.example/a")])
    [delivery], _, _ = planned_deliveries(DeliveryPlan.model_validate(raw))
    from flux_dagster.delivery.run import failed_result

    done = EmailDone(delivery, failed_result("email", "d", "a", info.value, 1))
    assert callback_withheld(done) == "the gmail email failed"


def test_without_email_host_the_email_is_written_to_the_outbox(tmp_path):
    settings = SmtpSettings(host=None, port=587, user=None, password=None, from_address="a@b.c",
                            outbox_dir=tmp_path / "emails")
    send_email(Email(to=["ana@example.com"], subject="s", text="local"), settings, "dlv_local", OFF)
    assert b"local" in (tmp_path / "emails" / "dlv_local.eml").read_bytes()


# ----- dedup (real Redis) ---------------------------------------------------------------------

@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client


def _one_delivery(raw: dict):
    [delivery], _, _ = planned_deliveries(DeliveryPlan.model_validate(raw))
    return delivery


def test_dedup_claim_send_confirm_and_duplicates(smtp, tmp_path, redis_client):
    raw = plan(outputNodes=[node("a", email={})])
    delivery = _one_delivery(raw)
    dedup = EmailDedup(REDIS_URL)
    keys = [k for k, _ in dedup.keys(delivery.flow_id, delivery.node_id, delivery.run_log_process_id, delivery.email)]
    try:
        assert email_once(delivery, smtp_settings(smtp, tmp_path), dedup, OFF).status == "sent"
        owner = delivery.delivery_id("email")
        assert [redis_client.get(k) for k in keys] == [f"sent:{owner}"] * 2
        assert 86000 < redis_client.ttl(keys[0]) <= 86400 and 0 < redis_client.ttl(keys[1]) <= 90
        # the same delivery again (a re-execution): already sent, not sent twice
        assert email_once(delivery, smtp_settings(smtp, tmp_path), dedup, OFF).status == "already_sent"
        # another run with the same content within 90 s: a duplicate, and its callback is withheld
        other = _one_delivery({**raw, "runLogProcessId": "log-other", "outputNodes": [node("a", email={},
                                                                                          callback="https://h/a")]})
        keys.append(dedup.keys(other.flow_id, other.node_id, other.run_log_process_id, other.email)[0][0])
        result = email_once(other, smtp_settings(smtp, tmp_path), dedup, OFF)
        assert result.status == "duplicate" and callback_withheld(EmailDone(other, result))
        assert redis_client.get(keys[2]) is None  # its first claim was released
        assert len(smtp.messages) == 1
    finally:
        redis_client.delete(*keys)


def test_dedup_releases_the_claim_when_the_send_fails_and_retakes_its_own(smtp, tmp_path, redis_client):
    delivery = _one_delivery(plan(outputNodes=[node("a", email={})]))
    dedup = EmailDedup(REDIS_URL)
    keys = [k for k, _ in dedup.keys(delivery.flow_id, delivery.node_id, delivery.run_log_process_id, delivery.email)]
    owner = delivery.delivery_id("email")
    try:
        smtp.fail_next = ["451 4.3.0 later"]
        with pytest.raises(DeliveryFailure):
            email_once(delivery, smtp_settings(smtp, tmp_path), dedup, OFF)
        assert [redis_client.get(k) for k in keys] == [None, None]
        # a claim left by a killed attempt of this same delivery is its own: taken again
        redis_client.set(keys[0], f"pending:{owner}", ex=300)
        assert email_once(delivery, smtp_settings(smtp, tmp_path), dedup, OFF).status == "sent"
        # a claim held by another delivery suppresses the send
        redis_client.set(keys[0], "pending:someone-else", ex=300)
        redis_client.delete(keys[1])
        assert email_once(delivery, smtp_settings(smtp, tmp_path), dedup, OFF).status == "duplicate"
        assert len(smtp.messages) == 1
    finally:
        redis_client.delete(*keys)


def test_redis_down_before_the_send_is_retryable_and_sends_nothing(smtp, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    delivery = _one_delivery(plan(outputNodes=[node("a", email={})]))
    with pytest.raises(DeliveryFailure) as info:
        email_once(delivery, smtp_settings(smtp, tmp_path), EmailDedup(closed), OFF)
    assert (info.value.code, info.value.retryable) == ("REDIS", True) and smtp.messages == []


def test_local_file_store_holds_plans_too(tmp_path):
    from flux_dagster.files.store import LocalFileStore

    store = LocalFileStore(tmp_path)
    (tmp_path / "delivery-plans").mkdir()
    (tmp_path / "delivery-plans" / "p.json").write_text(json.dumps(plan()))
    parsed, key = read_plan({"planKey": "delivery-plans/p.json"}, store)
    assert key == "delivery-plans/p.json" and parsed.runStatus == "finished"
    store.delete(key)
    store.delete(key)  # gone already: no error
    assert not (tmp_path / "delivery-plans" / "p.json").exists()


# ----- the job, in-process --------------------------------------------------------------------

@pytest.fixture
def app_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    create_schema(url)
    return url


def enqueue_delivery(app_url: str, payload: dict) -> int:
    with session_scope(app_url) as s:
        return queue.enqueue(s, kind="delivery", exec_id=str(uuid.uuid4()), flow_id=payload.get("flowId", "f"),
                             user_id="user-1", payload=payload).id


def run_delivery(app_url: str, pending_id: int, resources: dict):
    from dagster import DagsterInstance

    from flux_dagster.jobs.deliver_run_outputs import deliver_run_outputs
    from flux_dagster.sensors.pending_executions import run_request_for

    with session_scope(app_url) as s:
        [row] = [r for r in queue.claim_batch(s, 100, timedelta(seconds=60)) if r.id == pending_id]
        request = run_request_for(row, None)
    assert "payload" not in json.dumps(request.run_config)
    return deliver_run_outputs.execute_in_process(run_config=request.run_config, tags=request.tags,
                                                  resources=resources, instance=DagsterInstance.ephemeral(),
                                                  raise_on_error=False)


def delivery_resources(app_url, smtp, *, main_api=None, file_store=None):
    from flux_dagster_tests.conftest import make_resources

    extra = {"file_store": file_store} if file_store is not None else {}
    return make_resources(app_url, main_api=main_api, **extra, delivery_settings=DeliveryResource(
        email_host="127.0.0.1", email_port=smtp.port, email_user=smtp.user, email_password=smtp.password,
        email_from_address="runs@fluxprompt.test", redis_url=REDIS_URL, egress_mode="report"))


def row_of(app_url: str, pending_id: int) -> PendingExecution:
    with session_scope(app_url) as s:
        return s.get(PendingExecution, pending_id)


def test_job_delivers_email_then_callback_with_retries_and_api_callback_last(app_url, smtp, receiver, redis_client):
    raw = plan(outputNodes=[node("a", email={}, callback=f"{receiver.url}/hook/a")],
               apiCallback={"url": f"{receiver.url}/api", "body": {"status": "completed", "output": "x"}})
    receiver.script["/hook/a"] = [Reply(500), Reply(429, {}, {"Retry-After": "1"}), Reply(200)]
    pending_id = enqueue_delivery(app_url, raw)
    try:
        result = run_delivery(app_url, pending_id, delivery_resources(app_url, smtp))
    finally:
        redis_client.delete(f"email-sent:{raw['flowId']}:a:{raw['runLogProcessId']}")
    assert result.success
    assert row_of(app_url, pending_id).status == "completed"
    assert len(smtp.messages) == 1
    hooks = receiver.calls("/hook/a")
    assert len(hooks) == 3 and len({h.headers["x-fluxprompt-delivery-id"] for h in hooks}) == 1
    assert hooks[0].body["nodeId"] == "a" and hooks[0].body["output"] == "text of a"
    assert [r.path for r in receiver.requests][-1] == "/api"
    assert receiver.calls("/api")[0].body == {"status": "completed", "output": "x"}
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 2


def test_job_reports_a_delivery_that_failed_for_good_and_still_sends_the_rest(app_url, smtp, receiver, fake_main_api):
    raw = plan(outputNodes=[node("bad", callback=f"{receiver.url}/hook/bad"),
                            node("good", callback=f"{receiver.url}/hook/good")],
               apiCallback={"url": f"{receiver.url}/api", "body": {"status": "completed"}})
    receiver.script["/hook/bad"] = [Reply(400, {"error": "no"})]
    pending_id = enqueue_delivery(app_url, raw)
    result = run_delivery(app_url, pending_id, delivery_resources(app_url, smtp, main_api=fake_main_api))
    assert not result.success
    row = row_of(app_url, pending_id)
    assert row.status == "failed" and "1 of 3 deliveries failed: callback of node bad" in row.error
    assert len(receiver.calls("/hook/bad")) == 1  # 400: not retried
    assert len(receiver.calls("/hook/good")) == 1 and len(receiver.calls("/api")) == 1
    [report] = fake_main_api.calls("/worker/delivery-outcome")
    assert report.headers["idempotency-key"].endswith("-outcome")
    body = report.body
    assert (body["flowId"], body["nodeId"], body["channel"], body["attempts"], body["lastErrorCode"]) == \
        (raw["flowId"], "bad", "callback", 1, "HTTP_400")
    assert "/hook" not in json.dumps(body)  # host and status, never the URL path or payload
    with session_scope(app_url) as s:  # the failure hook did not fail the row a second time
        assert s.query(ExecutionLog).count() == 0
        assert s.query(StatusNotification).count() == 0  # deliveries have no node status to show


def test_job_without_main_api_writes_the_delivery_failed_row_locally(app_url, smtp, receiver):
    raw = plan(outputNodes=[node("bad", callback="not a url")])
    pending_id = enqueue_delivery(app_url, raw)
    result = run_delivery(app_url, pending_id, delivery_resources(app_url, smtp))
    assert not result.success and row_of(app_url, pending_id).status == "failed"
    with session_scope(app_url) as s:
        [log] = s.query(ExecutionLog).all()
        assert log.isError and log.nodeId == "bad" and log.message.startswith("Delivery failed: callback")
        assert log.metadata_["lastErrorCode"] == "INVALID_URL"


def test_job_reads_a_large_plan_from_s3_and_deletes_it(app_url, smtp, receiver, redis_client):
    from moto.server import ThreadedMotoServer

    from flux_dagster.files.resource import FileStoreResource

    keys = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        store = FileStoreResource(bucket="flux-files", endpoint_url=f"http://{host}:{port}", **keys)
        client = store.store()._client()
        client.create_bucket(Bucket="flux-files")
        big = plan(outputNodes=[node(f"n{i}", output="x" * 30_000) for i in range(10)]
                   + [node("a", callback=f"{receiver.url}/hook/a")])
        assert len(json.dumps(big)) > 262_144
        client.put_object(Bucket="flux-files", Key="delivery-plans/p1.json", Body=json.dumps(big).encode())
        pending_id = enqueue_delivery(app_url, {"planKey": "delivery-plans/p1.json"})
        result = run_delivery(app_url, pending_id, delivery_resources(app_url, smtp, file_store=store))
        assert result.success and row_of(app_url, pending_id).status == "completed"
        assert len(receiver.calls("/hook/a")) == 1
        assert client.list_objects_v2(Bucket="flux-files", Prefix="delivery-plans/").get("KeyCount") == 0
    finally:
        server.stop()


def test_malformed_delivery_rows(app_url, smtp):
    with session_scope(app_url) as s:
        row = queue.enqueue(s, kind="delivery", exec_id="e", flow_id="f", user_id="u")
        assert "payload (the delivery plan)" in queue.malformed_reason(row)
    pending_id = enqueue_delivery(app_url, {"flowId": "f", "runStatus": "finished"})
    result = run_delivery(app_url, pending_id, delivery_resources(app_url, smtp))
    assert not result.success
    row = row_of(app_url, pending_id)
    assert row.status == "failed" and "malformed" in row.error and "runLogProcessId" in row.error
    with session_scope(app_url) as s:  # the failure hook's error log; no notification
        [log] = s.query(ExecutionLog).all()
        assert log.isError and "malformed" in log.message and "Traceback" in log.errorStack
        assert s.query(StatusNotification).count() == 0


def test_cli_deliver_queues_a_valid_plan_and_refuses_a_bad_one(app_url, tmp_path):
    from click.testing import CliRunner

    from flux_dagster.cli import main

    good, bad = tmp_path / "plan.json", tmp_path / "bad.json"
    good.write_text(json.dumps(plan(outputNodes=[node("a", callback="https://h.example/a")])))
    bad.write_text(json.dumps({"flowId": "f"}))
    env = {"FLUX_DATABASE_URL": app_url}
    done = CliRunner().invoke(main, ["deliver", str(good), "--user", "user-1"], env=env)
    assert done.exit_code == 0 and "queued delivery" in done.output and "1 output node" in done.output
    refused = CliRunner().invoke(main, ["deliver", str(bad), "--user", "user-1"], env=env)
    assert refused.exit_code == 1 and "malformed" in refused.output
    with session_scope(app_url) as s:
        [row] = s.query(PendingExecution).all()
        assert row.kind == "delivery" and row.payload["outputNodes"][0]["nodeId"] == "a"
        assert queue.malformed_reason(row) is None
