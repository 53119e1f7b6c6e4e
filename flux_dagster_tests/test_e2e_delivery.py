"""A ``delivery`` row end to end through a real daemon and code server (SQLite storage): the email
reaches a real SMTP server, the callback survives a 500 and a 429 with one stable
``X-FluxPrompt-Delivery-Id``, the API v2 callback comes last, the row ends completed."""

import uuid

import pytest

from flux_dagster import queue
from flux_dagster.db.engine import create_schema, session_scope
from flux_dagster_tests.fakes.callbacks import CallbackReceiver
from flux_dagster_tests.fakes.http import Reply
from flux_dagster_tests.fakes.smtp import FakeSmtp
from flux_dagster_tests.test_e2e_daemon import deployment, runs_by_row, wait_terminal

pytestmark = pytest.mark.e2e


def test_delivery_row_is_delivered_through_the_daemon(tmp_path):
    import redis

    app_url = f"sqlite:///{tmp_path / 'app.db'}"
    create_schema(app_url)
    flow_id, scope = str(uuid.uuid4()), f"log-{uuid.uuid4().hex[:8]}"
    with FakeSmtp() as smtp, CallbackReceiver() as receiver:
        receiver.files["/files/summary.txt"] = b"the summary"
        receiver.script["/hook/out1"] = [Reply(500), Reply(429, {}, {"Retry-After": "1"})]
        plan = {
            "flowId": flow_id, "runLogProcessId": scope, "runStatus": "finished", "runType": "api_v2",
            "outputNodes": [{
                "nodeId": "out1", "label": "Summary", "output": "All good.",
                "email": {"to": ["ana@example.com"], "subject": "Your summary", "text": "All good.",
                          "attachments": [{"name": "summary.txt", "url": f"{receiver.url}/files/summary.txt"}]},
                "callback": {"url": f"{receiver.url}/hook/out1"},
            }],
            "apiCallback": {"url": f"{receiver.url}/api", "body": {"executionId": "e1", "status": "completed"}},
        }
        env_extra = {"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(smtp.port), "EMAIL_USER": smtp.user,
                     "EMAIL_PASSWORD": smtp.password, "EMAIL_FROM_ADDRESS": "runs@fluxprompt.test",
                     "REDIS_URL": "redis://127.0.0.1:6379/0", "EGRESS_POLICY_MODE": "enforce",
                     "FLUX_DELIVERY_ALLOWED_HOSTS": "127.0.0.1/32"}
        try:
            with deployment(tmp_path, app_url, env_extra) as env:
                with session_scope(app_url) as s:
                    pending_id = queue.enqueue(s, kind="delivery", exec_id=str(uuid.uuid4()), flow_id=flow_id,
                                               user_id="user-1", payload=plan).id
                row = wait_terminal(app_url, [pending_id])[pending_id]
                runs = runs_by_row(env)
        finally:
            redis.Redis.from_url("redis://127.0.0.1:6379/0").delete(f"email-sent:{flow_id}:out1:{scope}")

        assert (row.status, row.error) == ("completed", None)
        assert runs == {str(pending_id): ["SUCCESS"]}
        [email] = smtp.messages
        assert email.recipients == ["ana@example.com"] and email.message["Subject"] == "Your summary"
        assert [a.get_content() for a in email.message.iter_attachments()] == ["the summary"]
        hooks = receiver.calls("/hook/out1")
        assert len(hooks) == 3  # 500, 429, then accepted once
        assert len({h.headers["x-fluxprompt-delivery-id"] for h in hooks}) == 1
        assert hooks[-1].body["output"] == "All good."
        assert [r.path for r in receiver.requests if r.method == "POST"][-1] == "/api"
        assert len(receiver.calls("/api")) == 1
