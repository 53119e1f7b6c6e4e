"""Scripting node (reference §4.2): the plain functions, the bubblewrap sandbox against hostile
scripts, the Lambda runner through boto3 against a loopback Lambda, and ``process_single_node``
end to end on SQLite and Postgres."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import PendingExecution
from flux_dagster.errors import ExecutionTimeoutError, ProviderError, SystemError_, UserConfigError
from flux_dagster.execution import ExecutionRequest, NodeTask
from flux_dagster.nodes import scripting as sc
from flux_dagster.scripting import ScriptResponse
from flux_dagster.scripting.lambda_runner import LambdaRunner
from flux_dagster.scripting.resource import ScriptRunnerResource
from flux_dagster.scripting.sandbox import SANDBOX_UID_BASE, LocalSandboxRunner
from flux_dagster_tests.conftest import add_node, assert_failed, execute_node, execution, make_resources, node_data
from flux_dagster_tests.fakes.http import LoopbackServer, Reply
from flux_dagster_tests.fakes.lambda_api import FakeLambda, api_error, function_error

PROJECT_DIR = Path(__file__).resolve().parents[1]
CANARY = "sk-secret-canary"


@pytest.fixture(params=["host", "container"])
def sandbox(request):
    """Both profiles keep the same promises; only /proc differs (see test_proc_shows_only_the_sandbox)."""
    return LocalSandboxRunner(timeout_s=2, profile=request.param)


@pytest.fixture
def canary_env(monkeypatch):
    """A secret in the worker's own environment, as production has its provider keys."""
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)


def failed_with(response: ScriptResponse, *fragments: str) -> str:
    assert response.error is not None, response
    for fragment in fragments:
        assert fragment in response.error, response.error
    return response.error


def no_canary(response: ScriptResponse) -> None:
    assert CANARY not in json.dumps([response.result, response.console, response.error], default=str)


# ----- plain functions -------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["Python", "JavaScript"])
def test_language_accepts_the_two_languages(language):
    assert sc.check_language({"language": language}) == language


@pytest.mark.parametrize("language", ["Ruby", "python", "", None, ["Python"]])
def test_any_other_language_is_a_user_error(language):
    with pytest.raises(UserConfigError, match="Unsupported script language"):
        sc.check_language({"language": language})


def test_script_comes_from_non_empty_script_data_rows():
    data = {"scriptData": [{"text": "a = 1"}, {"text": ""}, {"other": 1}, "b = 2", {"text": None}],
            "script": "ignored"}
    assert sc.build_script(data) == "a = 1\nb = 2"


def test_script_falls_back_to_the_script_field():
    assert sc.build_script({"scriptData": [{"text": ""}], "script": "x = 1"}) == "x = 1"
    assert sc.build_script({"script": "x = 1"}) == "x = 1"


def test_an_empty_script_is_a_user_error():
    with pytest.raises(UserConfigError, match="empty"):
        sc.build_script({"scriptData": [], "script": "  \n"})


def test_variables_keep_named_rows():
    rows = [{"name": " a ", "value": 1}, {"name": "", "value": 2}, {"value": 3}, "x", {"name": "b"}]
    assert sc.script_variables({"variables": rows}) == [{"name": "a", "value": 1}, {"name": "b", "value": None}]
    assert sc.script_variables({}) == []
    with pytest.raises(UserConfigError):
        sc.script_variables({"variables": {"a": 1}})


def test_placeholders_are_replaced_in_one_pass():
    variables = [{"name": "name", "value": "Ada {{n}}"}, {"name": "n", "value": [1, 2]}, {"name": "t", "value": True}]
    script = "greet('{{name}}', {{n}}, {{t}}, {{unknown}}, {{ n }})"
    assert sc.substitute_variables(script, variables) == "greet('Ada {{n}}', [1, 2], true, {{unknown}}, {{ n }})"


def test_response_payloads_are_normalised():
    assert ScriptResponse.from_payload({"result": 1, "console": "a\nb", "error": ""}) == ScriptResponse(1, ("a", "b"))
    assert ScriptResponse.from_payload({"console": ["a", 2], "error": {"x": 1}}).error == '{"x": 1}'
    assert ScriptResponse.from_payload(None) == ScriptResponse()


class StubRunner:
    name = "stub"

    def __init__(self, response: ScriptResponse):
        self.response = response
        self.calls = []

    def run(self, language, script, variables):
        self.calls.append((language, script, variables))
        return self.response


def task_for(url, data) -> NodeTask:
    flow_id, node_id = add_node(url, "scripting", data)
    request = ExecutionRequest(exec_id="exec-1", flow_id=flow_id, user_id="user-1", node_id=node_id)
    return NodeTask(request=request, node_id=node_id, node_type="scripting", data=data)


def test_run_scripting_writes_result_and_console(app_db_url):
    data = {"language": "Python", "script": "setResult({{x}})", "variables": [{"name": "x", "value": 2}]}
    task = task_for(app_db_url, data)
    runner = StubRunner(ScriptResponse(result={"v": 2}, console=("hi", "[WARN] careful")))
    outcome = sc.run_scripting(app_db_url, runner, task)

    assert runner.calls == [("Python", "setResult(2)", [{"name": "x", "value": 2}])]
    assert outcome.output == {"result": {"v": 2}, "console": "hi\n[WARN] careful"}
    stored = node_data(app_db_url, task.node_id)
    assert (stored["result"], stored["console"], stored["executionStatus"]) == (
        {"v": 2}, "hi\n[WARN] careful", "COMPLETED")
    row = execution(app_db_url, "exec-1")
    assert (row.output, row.outputType, row.status) == ('{"v": 2}', "json", "COMPLETED")
    assert row.metadata_["runner"] == "stub"


def test_run_scripting_turns_the_script_error_into_a_user_error_and_keeps_the_console(app_db_url):
    task = task_for(app_db_url, {"language": "JavaScript", "script": "boom()", "result": "old"})
    runner = StubRunner(ScriptResponse(console=("before",), error="ReferenceError: boom is not defined"))
    with pytest.raises(UserConfigError) as caught:
        sc.run_scripting(app_db_url, runner, task)
    assert caught.value.user_message == "Script error: ReferenceError: boom is not defined"
    stored = node_data(app_db_url, task.node_id)
    assert stored["console"] == "before"
    assert stored.get("executionStatus") is None  # the error path marks FAILED, not this function


# ----- the local sandbox -----------------------------------------------------------------------


def test_python_script_api(sandbox):
    script = """
console.log("hello", name, 1 + n)
console.warn("careful")
console.error("bad")
print("printed", end="")
setResult({"n": n * 2, "items": items, "none": None})
"""
    variables = [{"name": "name", "value": "Ada"}, {"name": "n", "value": 20}, {"name": "items", "value": [1, "b"]},
                 {"name": "not an identifier", "value": 0}]
    response = sandbox.run("Python", script, variables)
    assert response == ScriptResponse(result={"n": 40, "items": [1, "b"], "none": None},
                                      console=("hello Ada 21", "[WARN] careful", "[ERROR] bad", "printed"))


def test_javascript_script_api(sandbox):
    script = """
console.log("hello", name, n + 1, {a: 1});
console.warn("careful");
console.error("bad");
setResult({n: n * 2, items});
"""
    variables = [{"name": "name", "value": "Ada"}, {"name": "n", "value": 20}, {"name": "items", "value": [1, "b"]}]
    response = sandbox.run("JavaScript", script, variables)
    assert response == ScriptResponse(result={"n": 40, "items": [1, "b"]},
                                      console=("hello Ada 21 { a: 1 }", "[WARN] careful", "[ERROR] bad"))


def test_javascript_result_is_the_last_expression_or_its_promise(sandbox):
    assert sandbox.run("JavaScript", "const a = 2; a * 21", []).result == 42
    assert sandbox.run("JavaScript", "(async () => 'later')()", []).result == "later"
    assert sandbox.run("JavaScript", "let unused;", []).result is None


def test_script_errors_come_back_with_the_console_so_far(sandbox):
    response = sandbox.run("Python", "console.log('step 1')\n\nraise ValueError('no good')", [])
    error = failed_with(response, 'File "<script>", line 3', "ValueError: no good")
    assert "python_runner" not in error  # the wrapper's own frames stay hidden
    assert response.console == ("step 1",)
    response = sandbox.run("JavaScript", "console.log('step 1'); null.x", [])
    failed_with(response, "TypeError")
    assert response.console == ("step 1",)


def test_a_non_zero_exit_is_an_error(sandbox):
    failed_with(sandbox.run("Python", "import sys\nsys.exit(3)", []), "status 3")
    assert sandbox.run("Python", "import sys\nsetResult(1)\nsys.exit(0)", []).result == 1


def sandbox_processes() -> list[str]:
    """Processes still running under a sandbox uid (sandboxes started by root get one)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid = int(next(line for line in status.read_text().splitlines() if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if uid >= SANDBOX_UID_BASE:
            found.append(status.parent.name)
    return found


def assert_nothing_left() -> None:
    if os.geteuid() == 0:  # otherwise the sandbox runs as the worker's uid and cannot be told apart
        assert sandbox_processes() == []


@pytest.mark.parametrize("language,script", [
    ("Python", "while True:\n    pass"),
    ("JavaScript", "for (;;) {}"),
])
def test_infinite_loops_hit_the_time_limit(sandbox, language, script):
    failed_with(sandbox.run(language, script, []), "time limit")
    assert_nothing_left()


@pytest.mark.parametrize("language,script,message", [
    ("Python", "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", "512 MB"),
    ("JavaScript", "const a = []; for (;;) a.push(new Array(1e6).fill(1.5));", "out of memory"),
])
def test_memory_bombs_hit_the_memory_cap(language, script, message):
    failed_with(LocalSandboxRunner(timeout_s=20).run(language, script, []), message)


@pytest.mark.parametrize("script", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nprocs = [subprocess.Popen(['sleep', '60']) for _ in range(1000)]",
])
def test_fork_bombs_hit_the_process_limit_and_leave_nothing_behind(script):
    response = LocalSandboxRunner(timeout_s=10).run("Python", script, [])
    failed_with(response, "Resource temporarily unavailable")
    assert_nothing_left()


@pytest.mark.parametrize("language,script,message", [
    ("Python", "while True:\n    print('x' * 1000)", "console output exceeded"),
    ("JavaScript", "for (;;) console.log('x'.repeat(1000));", "console output exceeded"),
    ("Python", "setResult('x' * 2_000_000)", "result exceeded"),
    ("Python", "import os\nwhile True:\n    os.write(1, b'x' * 100_000)", "output exceeded"),
])
def test_huge_output_hits_the_output_limit(sandbox, language, script, message):
    response = sandbox.run(language, script, [])
    failed_with(response, message)
    assert sum(len(line) for line in response.console) <= sandbox.output_limit_bytes


def test_the_environment_is_empty(sandbox, canary_env):
    response = sandbox.run("Python", "import os\nprint(os.environ)\nsetResult(dict(os.environ))", [])
    assert set(response.result) <= {"PATH", "HOME", "LANG", "PWD", "LC_CTYPE"}
    no_canary(response)
    escaped = "this.constructor.constructor('return process')().env"  # the vm is no boundary
    response = sandbox.run("JavaScript", escaped, [])
    assert set(response.result) <= {"PATH", "HOME", "LANG", "PWD", "LC_CTYPE"}
    no_canary(response)


def test_proc_shows_only_the_sandbox(sandbox, canary_env):
    script = """
import os
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
environs = {}
for pid in pids + [worker_pid]:
    try:
        environs[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode()
    except OSError as exc:
        environs[pid] = type(exc).__name__
setResult({'pids': pids, 'environs': environs})
"""
    worker_pid = os.getpid()
    response = sandbox.run("Python", script, [{"name": "worker_pid", "value": worker_pid}])
    if sandbox.profile == "container":  # no /proc at all: not even the sandbox's own processes
        failed_with(response, "FileNotFoundError", "/proc")
        return
    assert response.error is None, response.error
    assert worker_pid not in response.result["pids"] and len(response.result["pids"]) <= 3
    assert response.result["environs"][str(worker_pid)] == "FileNotFoundError"
    no_canary(response)


@pytest.mark.parametrize("path", [
    str(PROJECT_DIR / "pyproject.toml"), str(PROJECT_DIR / ".venv" / "pyvenv.cfg"), "/root", "/work", "/etc/passwd",
])
def test_worker_files_are_not_there(sandbox, path):
    script = f"import os\np = {path!r}\nsetResult(os.listdir(p) if os.path.isdir(p) else open(p).read())"
    failed_with(sandbox.run("Python", script, []), "FileNotFoundError")


def test_only_a_capped_tmp_is_writable(sandbox):
    script = """
import os
writes = {}
for path in ['/owned', '/usr/owned', '/dev/owned', '/dev/shm/owned', '/sandbox/owned']:
    try:
        open(path, 'w').close()
        writes[path] = 'written'
    except OSError as exc:
        writes[path] = exc.strerror
try:
    for i in range(20):
        with open(f'/tmp/block{i}', 'wb') as f:
            f.write(b'x' * 8 * 2**20)
except OSError as exc:
    writes['/tmp'] = exc.strerror
open('/dev/null', 'w').write('fine')
setResult({'top': sorted(os.listdir('/')), 'writes': writes, 'cwd': os.getcwd()})
"""
    result = sandbox.run("Python", script, []).result
    assert set(result["top"]) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sandbox", "sbin", "tmp",
                                  "usr"}
    assert result["writes"].pop("/tmp") == "No space left on device"
    assert set(result["writes"].values()) == {"Read-only file system"}
    assert result["cwd"] == "/tmp"


def test_the_working_directory_is_thrown_away(sandbox):
    import tempfile

    before = {p.name for p in Path(tempfile.gettempdir()).glob("flux-script-*")}
    first = sandbox.run("Python", "open('state.txt', 'w').write('x')\nsetResult(__import__('os').listdir('.'))", [])
    assert first.result == ["state.txt"]
    second = sandbox.run("Python", "import os\nsetResult(os.listdir('.'))", [])
    assert second.result == []
    assert {p.name for p in Path(tempfile.gettempdir()).glob("flux-script-*")} == before


def test_there_is_no_network(sandbox):
    with LoopbackServer(lambda req: Reply(200, {"ok": True})) as server:
        port = int(server.url.rsplit(":", 1)[1])
        script = "import socket\nsocket.create_connection(('127.0.0.1', port), timeout=2)"
        failed_with(sandbox.run("Python", script, [{"name": "port", "value": port}]), "ConnectionRefusedError")
        script = "import urllib.request\nurllib.request.urlopen('http://localhost:%d/' % port, timeout=2)"
        failed_with(sandbox.run("Python", script, [{"name": "port", "value": port}]), "URLError")
        assert server.requests == []


def test_a_missing_bwrap_is_a_clear_system_error(sandbox, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemError_) as caught:
        sandbox.run("Python", "setResult(1)", [])
    assert "bubblewrap" in caught.value.user_message and "`bubblewrap` package" in caught.value.dev_message


def test_javascript_without_node_is_a_clear_system_error(sandbox, monkeypatch):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None if name == "node" else which(name, **kw))
    with pytest.raises(SystemError_) as caught:
        sandbox.run("JavaScript", "1", [])
    assert "Node.js is not installed" in caught.value.user_message
    assert sandbox.run("Python", "setResult(1)", []).result == 1


# ----- the Lambda runner -----------------------------------------------------------------------


@pytest.fixture
def fake_lambda():
    with FakeLambda(timeout_s=2) as server:
        yield server


def lambda_runner(fake, alias="non-prod") -> LambdaRunner:
    return ScriptRunnerResource(mode="lambda", lambda_endpoint=fake.url, lambda_python_alias=alias,
                                aws_access_key_id="AKIDTEST", aws_secret_access_key="test-secret").runner()


def test_lambda_python_is_invoked_with_the_alias(fake_lambda):
    response = lambda_runner(fake_lambda).run(
        "Python", "console.warn('w')\nsetResult(x * 2)", [{"name": "x", "value": 21}])
    assert response == ScriptResponse(result=42, console=("[WARN] w",))
    [call] = fake_lambda.invocations
    assert call.path == "/2015-03-31/functions/code-executor-python/invocations?Qualifier=non-prod"
    assert call.body == {"script": "console.warn('w')\nsetResult(x * 2)", "variables": [{"name": "x", "value": 21}]}
    assert call.headers["x-amz-invocation-type"] == "RequestResponse"
    assert "Credential=AKIDTEST/" in call.headers["authorization"]


def test_lambda_javascript_has_no_qualifier(fake_lambda):
    assert lambda_runner(fake_lambda).run("JavaScript", "6 * 7", []).result == 42
    [call] = fake_lambda.invocations
    assert call.path == "/2015-03-31/functions/code-executor-js/invocations"


def test_lambda_script_error_is_the_response_error(fake_lambda):
    response = lambda_runner(fake_lambda).run("Python", "console.log('a')\n1/0", [])
    failed_with(response, "ZeroDivisionError")
    assert response.console == ("a",)


def test_lambda_python_without_an_alias_fails_closed(fake_lambda):
    with pytest.raises(SystemError_, match="LAMBDA_PYTHON_ALIAS is not set") as caught:
        lambda_runner(fake_lambda, alias=None).run("Python", "1", [])
    assert "not configured" in caught.value.user_message
    assert fake_lambda.invocations == []


@pytest.mark.parametrize("reply,message", [
    (function_error("Sandbox.Timedout", "Task timed out after 30.00 seconds"), "time limit"),
    (function_error("Runtime.ExitError", "RequestId: 1 Error: Runtime exited with error: exit status 1"), "runtime"),
    (function_error("Runtime.OutOfMemory", "Runtime exited with error: signal: killed"), "out of memory"),
])
def test_lambda_function_errors_caused_by_the_script_are_script_errors(fake_lambda, reply, message):
    fake_lambda.failures.append(reply)
    failed_with(lambda_runner(fake_lambda).run("Python", "1", []), message)


@pytest.mark.parametrize("reply,error_class,retryable", [
    (api_error(429, "TooManyRequestsException", "Rate exceeded"), ProviderError, True),
    (api_error(500, "ServiceException", "internal"), ProviderError, True),
    (api_error(502, "EC2ThrottledException", "throttled"), ProviderError, True),
    (api_error(403, "AccessDeniedException", "not allowed"), ProviderError, False),
    (function_error("Runtime.ImportModuleError", "No module named 'handler'"), ProviderError, False),
    (Reply(200, b"<html>not json</html>"), ProviderError, False),
])
def test_lambda_failures_map_to_error_classes(fake_lambda, reply, error_class, retryable):
    fake_lambda.failures.append(reply)
    with pytest.raises(error_class) as caught:
        lambda_runner(fake_lambda).run("JavaScript", "1", [])
    assert caught.value.retryable is retryable


def test_lambda_unknown_alias_is_not_retryable(fake_lambda):
    with pytest.raises(ProviderError, match="ResourceNotFoundException") as caught:
        lambda_runner(fake_lambda, alias="prod").run("Python", "1", [])
    assert not caught.value.retryable


def test_lambda_unreachable_is_retryable():
    with LoopbackServer(lambda req: Reply()) as server:
        url = server.url  # a port that was just in use and is now closed
    runner = LambdaRunner(python_alias="non-prod", endpoint_url=url, access_key_id="a", secret_access_key="b")
    with pytest.raises((ProviderError, ExecutionTimeoutError)) as caught:
        runner.run("Python", "1", [])
    assert caught.value.retryable


@pytest.mark.parametrize("env,mode", [
    ({}, "local"),
    ({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s"}, "local"),
    ({"LAMBDA_PYTHON_ALIAS": "prod"}, "lambda"),
    ({"LAMBDA_ENDPOINT": "http://127.0.0.1:4566"}, "lambda"),
    ({"LAMBDA_PYTHON_ALIAS": "prod", "FLUX_SCRIPT_RUNNER": "local"}, "local"),
    ({"FLUX_SCRIPT_RUNNER": "lambda"}, "lambda"),
])
def test_runner_selection_from_the_environment(monkeypatch, env, mode):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "LAMBDA_PYTHON_ALIAS",
                 "LAMBDA_ENDPOINT", "FLUX_SCRIPT_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    resource = ScriptRunnerResource.from_env()
    assert resource.mode == mode
    if mode == "lambda" and "AWS_ACCESS_KEY_ID" in env:
        assert type(resource.aws_access_key_id).__name__ == "EnvVar"


def test_sandbox_profile_from_the_environment(monkeypatch):
    monkeypatch.delenv("FLUX_SCRIPT_RUNNER", raising=False)
    monkeypatch.delenv("LAMBDA_PYTHON_ALIAS", raising=False)
    monkeypatch.delenv("LAMBDA_ENDPOINT", raising=False)
    monkeypatch.setenv("FLUX_SANDBOX_PROFILE", "container")
    assert ScriptRunnerResource.from_env().runner().profile == "container"
    monkeypatch.setenv("FLUX_SANDBOX_PROFILE", "docker")
    with pytest.raises(SystemError_) as caught:
        ScriptRunnerResource.from_env().runner()
    assert "host, container" in caught.value.dev_message


def test_boto3_is_imported_only_when_lambda_runs():
    code = ("import sys, flux_dagster.ops.scripting, flux_dagster.nodes.scripting; "
            "print('boto3' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_DIR)
    assert out.stdout.strip() == "False"


# ----- process_single_node, end to end ---------------------------------------------------------


def run_script_node(url, data, **resources):
    flow_id, node_id = add_node(url, "scripting", data)
    return execute_node(url, make_resources(url, **resources), flow_id, node_id), node_id


def attempts(run) -> int:
    return sum(1 for e in run.result.all_events
               if e.event_type_value in ("STEP_START", "STEP_RESTARTED") and e.step_key == "scripting")


def test_python_node_end_to_end(app_db_url):
    data = {"language": "Python", "label": "Doubler",
            "scriptData": [{"text": "total = sum(numbers) * {{factor}}"}, {"text": "console.log('total', total)"},
                           {"text": "setResult({'total': total})"}],
            "variables": [{"name": "numbers", "value": [1, 2, 3]}, {"name": "factor", "value": 10}]}
    run, node_id = run_script_node(app_db_url, data)
    assert run.result.success
    stored = node_data(app_db_url, node_id)
    assert (stored["result"], stored["console"], stored["executionStatus"]) == ({"total": 60}, "total 60", "COMPLETED")
    row = execution(app_db_url, run.exec_id)
    assert (row.status, row.isError, row.output, row.outputType) == ("COMPLETED", False, '{"total": 60}', "json")
    assert row.outputData == {"result": {"total": 60}, "console": "total 60"}
    with session_scope(app_db_url) as s:
        assert s.get(PendingExecution, run.pending_id).status == "completed"
    assert run.result.output_for_node("scripting").output == {"result": {"total": 60}, "console": "total 60"}


def test_script_error_fails_once_with_the_console_kept(app_db_url):
    data = {"language": "Python", "script": "console.log('starting')\nraise RuntimeError('bad input')"}
    run, node_id = run_script_node(app_db_url, data)
    stored = assert_failed(app_db_url, run, node_id, "RuntimeError: bad input")
    assert stored["console"] == "starting"
    assert attempts(run) == 1
    assert execution(app_db_url, run.exec_id).metadata_["code"] == "USER_CONFIG_ERROR"


def test_unknown_language_fails_once(app_db_url):
    run, node_id = run_script_node(app_db_url, {"language": "Ruby", "script": "puts 1"})
    assert_failed(app_db_url, run, node_id, "Unsupported script language 'Ruby'")
    assert attempts(run) == 1


def test_javascript_node_through_lambda_end_to_end(app_db_url, fake_lambda):
    data = {"language": "JavaScript", "script": "console.error('e'); `${greeting}, {{who}}`",
            "variables": [{"name": "greeting", "value": "Hello"}, {"name": "who", "value": "Ada"}]}
    runner = ScriptRunnerResource(mode="lambda", lambda_endpoint=fake_lambda.url, lambda_python_alias="non-prod",
                                  aws_access_key_id="a", aws_secret_access_key="b")
    run, node_id = run_script_node(app_db_url, data, script_runner=runner)
    assert run.result.success
    stored = node_data(app_db_url, node_id)
    assert (stored["result"], stored["console"]) == ("Hello, Ada", "[ERROR] e")
    assert execution(app_db_url, run.exec_id).outputType == "text"


def test_lambda_throttling_is_retried_and_a_script_error_is_not(app_db_url, fake_lambda):
    runner = ScriptRunnerResource(mode="lambda", lambda_endpoint=fake_lambda.url, lambda_python_alias="non-prod",
                                  aws_access_key_id="a", aws_secret_access_key="b")
    fake_lambda.failures.append(api_error(429, "TooManyRequestsException", "Rate exceeded"))
    run, _ = run_script_node(app_db_url, {"language": "Python", "script": "setResult(1)"}, script_runner=runner)
    assert run.result.success and len(fake_lambda.invocations) == 2 and attempts(run) == 2

    fake_lambda.requests.clear()
    run, node_id = run_script_node(app_db_url, {"language": "Python", "script": "1/0"}, script_runner=runner)
    assert_failed(app_db_url, run, node_id, "ZeroDivisionError")
    assert len(fake_lambda.invocations) == 1 and attempts(run) == 1
