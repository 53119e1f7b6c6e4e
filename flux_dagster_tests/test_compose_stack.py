"""The container stack of docker/, built and run end to end (``make compose-test``, marker ``compose``,
not in the default run: a cold build takes minutes).

It starts its own ``dockerd`` when none answers, builds a Debian base image when none is given
(``FLUX_BASE_IMAGE``, else ``debootstrap`` + ``docker import``: Docker Hub is not reachable
here), builds the images, brings the compose stack up under its own project name and ports, and
checks, as an operator would: the UI only with a password, the read-only UI refusing mutations,
executions of every node type (a script among them) through the CLI inside a container, history,
files and rows surviving ``down`` + ``up``, and Prometheus scraping the worker. Timings go to
stdout (``pytest -s``) and to ``$FLUX_COMPOSE_TEST_DIR/timings.json``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flux_dagster_tests.test_e2e_daemon import free_port

# Generous waits, each overridable: this 2-core machine is shared and at times saturated (load
# averages of 50+), where a stack start or a run worker's start takes minutes.
UP_TIMEOUT_S = float(os.environ.get("FLUX_COMPOSE_UP_TIMEOUT_S", 900))  # `up` until both UIs answer
RUN_TIMEOUT_S = float(os.environ.get("FLUX_COMPOSE_RUN_TIMEOUT_S", 1800))  # enqueue until all terminal

pytestmark = [pytest.mark.compose, pytest.mark.timeout(int(3600 + 2 * UP_TIMEOUT_S + 2 * RUN_TIMEOUT_S))]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
PROJECT = "fluxcomposetest"
LOCAL_BASE = "flux-dagster-base:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WORK = Path(os.environ.get("FLUX_COMPOSE_TEST_DIR") or tempfile.gettempdir()) / "flux-compose-test"
TIMINGS: dict[str, float] = {}

# Debian's docker.io CLI has BuildKit built in (``--secret``); a newer CLI needs its buildx plugin.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
SERVICES_IMAGES = {"postgres": "postgres", "redis": "redis", "prometheus": "prometheus", "proxy": "proxy"}


def sh(*argv, check=True, timeout=900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=check, timeout=timeout, capture_output=True, text=True, **kw)


def timed(name: str):
    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            TIMINGS[name] = round(time.monotonic() - self.start, 1)
            print(f"[compose-test] {name}: {TIMINGS[name]} s", flush=True)
            WORK.mkdir(parents=True, exist_ok=True)
            (WORK / "timings.json").write_text(json.dumps(TIMINGS, indent=2))

    return _Timer()


# ----- the engine, the base image, the images ------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    """A Docker engine: the running one, else a ``dockerd`` of our own, stopped at the end by pid."""
    if sh(DOCKER, "info", check=False).returncode == 0:
        yield
        return
    WORK.mkdir(parents=True, exist_ok=True)
    log = open(WORK / "dockerd.log", "w")
    dockerd = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while sh(DOCKER, "info", check=False).returncode != 0:
            assert dockerd.poll() is None and time.monotonic() < deadline, (WORK / "dockerd.log").read_text()[-3000:]
            time.sleep(1)
        yield
    finally:
        dockerd.terminate()
        try:
            dockerd.wait(60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
        log.close()


def base_image() -> str:
    """``FLUX_BASE_IMAGE`` (e.g. python:3.11-slim where Docker Hub is reachable), else a Debian
    bookworm image built here from Debian's packages, once."""
    if os.environ.get("FLUX_BASE_IMAGE"):
        return os.environ["FLUX_BASE_IMAGE"]
    if sh(DOCKER, "image", "inspect", LOCAL_BASE, check=False).returncode != 0:
        with timed("base image (debootstrap + docker import)"), tempfile.TemporaryDirectory() as rootfs:
            sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
               rootfs, "http://deb.debian.org/debian")
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            sh(DOCKER, "import", "-", LOCAL_BASE, stdin=tar.stdout)
            assert tar.wait() == 0
    return LOCAL_BASE


def build(dockerfile: str, tag: str, base: str, target: str | None = None) -> None:
    argv = [DOCKER, "build", "-f", REPO / "docker" / dockerfile, "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    if target:
        argv += ["--target", target]
    if CA_BUNDLE.exists():  # a TLS-intercepting proxy in front of PyPI: pip needs the machine's CA
        argv += ["--secret", f"id=pip_ca,src={CA_BUNDLE}"]
    done = sh(*argv, REPO, check=False, env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def images(engine):
    base = base_image()
    with timed("build: worker image"):
        build("Dockerfile", "flux_dagster_image", base)
    with timed("build: postgres, redis, prometheus, proxy images"):
        for target, name in SERVICES_IMAGES.items():
            build("services.Dockerfile", f"flux_dagster_{name}", base, target)


# ----- the stack -------------------------------------------------------------------------------------


class Stack:
    def __init__(self):
        self.ui_port, self.viewer_port, self.prometheus_port = free_port(), free_port(), free_port()
        self.admin = ("admin", secrets.token_urlsafe(12))
        self.viewer = ("viewer", secrets.token_urlsafe(12))
        self.env = {
            **os.environ,
            "FLUX_UI_PORT": str(self.ui_port), "FLUX_UI_VIEWER_PORT": str(self.viewer_port),
            "FLUX_PROMETHEUS_PORT": str(self.prometheus_port),
            "FLUX_UI_ADMIN_PASSWORD": self.admin[1], "FLUX_UI_VIEWER_PASSWORD": self.viewer[1],
            # What the test flow's API caller and SQL querier reach inside the stack's network.
            "FLUX_APICALLER_ALLOWED_HOSTS": "flux_dagster_webserver",
            "FLUX_SQLQUERIER_ALLOWED_HOSTS": "flux_dagster_postgresql",
        }
        compose_plugin = sh(DOCKER, "compose", "version", check=False).returncode == 0
        self.compose_argv = [DOCKER, "compose"] if compose_plugin else ["docker-compose"]

    def compose(self, *args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
        done = sh(*self.compose_argv, "-p", PROJECT, "-f", COMPOSE_FILE, *args, check=False, env=self.env,
                  timeout=timeout, **kw)
        assert not check or done.returncode == 0, f"compose {args}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done

    def python(self, code: str, service: str = "flux_dagster_user_code") -> object:
        """Run Python inside a service's container; its last stdout line is JSON."""
        done = self.compose("exec", "-T", service, "python", "-c", code)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def up(self) -> None:
        self.compose("up", "-d", "--no-build")
        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            try:
                statuses = {self.request(port, "/graphql", auth, {"query": "{ version }"})[0]
                            for port, auth in ((self.ui_port, self.admin), (self.viewer_port, self.viewer))}
                if statuses == {200}:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.logs()
            time.sleep(2)

    def logs(self, *services: str, tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout[-20000:]

    def request(self, port: int, path: str = "/", auth: tuple[str, str] | None = None, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def graphql(self, query: str, port: int | None = None, auth=None) -> dict:
        status, text = self.request(port or self.ui_port, "/graphql", auth or self.admin, {"query": query})
        assert status == 200, (status, text[:500])
        return json.loads(text)


@pytest.fixture(scope="module")
def stack(images):
    stack = Stack()
    stack.compose("down", "-v", "--remove-orphans", check=False)  # a previous run cut short
    try:
        with timed("up (cold: volumes created, schema migrated)"):
            stack.up()
        yield stack
    finally:
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "compose.log").write_text(stack.compose("logs", "--no-color", check=False).stdout)
        with timed("teardown: down -v"):
            stack.compose("down", "-v", "--remove-orphans", check=False)


# ----- the checks ------------------------------------------------------------------------------------


def test_the_ui_needs_a_password(stack):
    with timed("check: 401 without credentials, UIs with them"):
        the_ui_needs_a_password(stack)


def the_ui_needs_a_password(stack):
    for port in (stack.ui_port, stack.viewer_port):
        status, _ = stack.request(port)
        assert status == 401
        status, _ = stack.request(port, auth=(stack.admin[0], "wrong"))
        assert status == 401
    status, _ = stack.request(stack.ui_port, auth=stack.viewer)  # viewers never reach the full UI
    assert status == 401
    status, page = stack.request(stack.ui_port, auth=stack.admin)
    assert status == 200 and "Dagster" in page
    status, page = stack.request(stack.viewer_port, auth=stack.viewer)
    assert status == 200 and "Dagster" in page


def test_the_read_only_ui_refuses_mutations(stack):
    query = "{ permissions { permission value } }"
    viewer = {p["permission"]: p["value"]
              for p in stack.graphql(query, stack.viewer_port, stack.viewer)["data"]["permissions"]}
    admin = {p["permission"]: p["value"] for p in stack.graphql(query)["data"]["permissions"]}
    assert viewer["launch_pipeline_execution"] is False and viewer["terminate_pipeline_execution"] is False
    assert admin["launch_pipeline_execution"] is True and admin["terminate_pipeline_execution"] is True
    mutation = 'mutation { terminateRun(runId: "00000000-0000-0000-0000-000000000000") { __typename } }'
    assert stack.graphql(mutation, stack.viewer_port, stack.viewer)["data"]["terminateRun"]["__typename"] == \
        "UnauthorizedError"
    assert stack.graphql(mutation)["data"]["terminateRun"]["__typename"] == "RunNotFoundError"


# One node of every type the worker runs; the API caller and the SQL querier reach services of the stack.
NODES = {
    "writer": ("commandTextNode", {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": "Write a report.",
                                   "saveOutput": True, "fileType": "pdf", "customFileName": "report"}),
    "python-script": ("scripting", {"language": "Python", "variables": [{"name": "a", "value": 41}],
                                    "script": "import os\nsetResult({'sum': {{a}} + 1, 'proc': os.path.exists('/proc')})"}),
    "js-script": ("scripting", {"language": "JavaScript", "script": "setResult([1, 2, 3].map(x => x * 2))"}),
    "display": ("outputController", {"text": "# Hello from the stack", "saveOutput": True, "fileExtension": "md",
                                     "customFileName": "hello"}),
    "api": ("apiCaller", {"method": "GET", "url": "http://flux_dagster_webserver:3000/server_info"}),
    "math": ("mathFunction", {"formula": "price * (1 + tax)", "variables": [{"id": "1", "name": "price", "value": 100},
                                                                            {"id": "2", "name": "tax", "value": 0.2}]}),
    "counter": ("counterNode", {"counterMode": "up", "text": "41"}),
    "sql": ("sqlQuerier", {"dbms": "postgresql", "host": "flux_dagster_postgresql", "port": 5432,
                           "username": "postgres_user", "password": "postgres_password", "database": "flux_app",
                           "ssl": False, "query": "SELECT 1 + 1 AS two"}),
    "image": ("imageGenerator", {"prompt": "A quiet harbour"}),
    "transcript": ("audioReaderNode", {"type": "ytTranscript", "youtubeUrl": "https://youtu.be/dQw4w9WgXcQ"}),
}
FLOW = "00000000-0000-4000-8000-00000000c0de"

# The main API's side, played inside the user-code container: its tables, a flow with the nodes above.
SEED = f"""
import json
from flux_dagster import demo, settings
from flux_dagster.db.engine import create_schema, session_scope
from flux_dagster.db.models import Flow, FlowNode
create_schema(settings.database_url())
with session_scope(settings.database_url()) as s:
    demo.seed(s)
    if s.get(Flow, {FLOW!r}) is None:
        s.add(Flow(id={FLOW!r}, name="compose test", userId="compose-user"))
        for node_id, (node_type, data) in json.loads({json.dumps(json.dumps(NODES))}).items():
            s.add(FlowNode(flowId={FLOW!r}, nodeId=node_id, type=node_type, data=data))
print(json.dumps("seeded"))
"""

STATE = f"""
import json
from sqlalchemy import select, func
from flux_dagster import settings
from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import FlowNode, PendingExecution, TokenLedgerEntry
with session_scope(settings.database_url()) as s:
    rows = {{r.id: [r.node_id or r.kind, r.status, r.error, r.dagster_run_id]
             for r in s.scalars(select(PendingExecution).order_by(PendingExecution.id))}}
    nodes = {{n.nodeId: n.data for n in s.scalars(select(FlowNode).where(FlowNode.flowId == {FLOW!r}))}}
    charges = s.scalar(select(func.count()).select_from(TokenLedgerEntry))
print(json.dumps({{"rows": rows, "nodes": nodes, "charges": charges}}, default=str))
"""

FILES = """
import json, os
root = '/var/lib/flux/files'
found = {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
         for d, _, files in os.walk(root) for f in files}
print(json.dumps(found))
"""

RUNS = "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"


def enqueue(stack: Stack, *executions: list[str]) -> None:
    """``flux-dagster enqueue`` inside the user-code container, as an operator would (one
    ``docker exec`` for them all)."""
    commands = [shlex.join(["flux-dagster", "enqueue", *args, "--user", "compose-user"]) for args in executions]
    stack.compose("exec", "-T", "flux_dagster_user_code", "sh", "-ec", " && ".join(commands))


def wait_terminal(stack: Stack, count: int) -> dict:
    """The app DB's rows once ``count`` are there and all terminal; every one completed, else
    the failure explained (``explain``)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        state = stack.python(STATE)
        statuses = [row[1] for row in state["rows"].values()]
        if len(statuses) >= count and all(s in ("completed", "failed", "cancelled") for s in statuses):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"not all terminal after {RUN_TIMEOUT_S:.0f} s:\n{explain(stack, state)}")
        time.sleep(3)
    if any(row[1] != "completed" for row in state["rows"].values()):
        pytest.fail(f"not all completed:\n{explain(stack, state)}")
    return state


RUN_EVENTS = """{ logsForRun(runId: "%s") { ... on EventConnection { events {
    __typename ... on MessageEvent { message level } } } } }"""


def explain(stack: Stack, state: dict) -> str:
    """Every execution not completed: its row, its Dagster run's warnings and errors, and the
    daemon's log (where run workers start and print); also written to ``failures.txt``."""
    parts = []
    for row_id, (node, status, error, run_id) in state["rows"].items():
        if status == "completed":
            continue
        parts.append(f"execution {row_id} ({node}): {status}, error={error!r}, run {run_id}")
        if run_id:
            events = stack.graphql(RUN_EVENTS % run_id)["data"]["logsForRun"].get("events") or []
            parts += [f"  {e['__typename']} {e.get('level')}: {(e.get('message') or '')[:2000]}"
                      for e in events if e.get("level") in ("WARNING", "ERROR", "CRITICAL")
                      or e["__typename"] in ("EngineEvent", "RunFailureEvent", "ExecutionStepFailureEvent")]
    text = "\n".join(parts + ["--- daemon log ---", stack.logs("flux_dagster_daemon", tail=400),
                              "--- user code log ---", stack.logs("flux_dagster_user_code", tail=100)])
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "failures.txt").write_text(text)
    return text[-30000:]


def test_every_node_type_runs_and_history_files_and_rows_survive_a_restart(stack):
    from flux_dagster.demo import DEMO_AGENT_FLOW

    assert stack.python(SEED) == "seeded"
    with timed(f"executions: {len(NODES)} nodes + 1 agent, enqueue → all terminal"):
        # The scripts first and alone: their 30 s limit is wall-clock, and this machine is shared.
        scripts = [node_id for node_id, (node_type, _) in NODES.items() if node_type == "scripting"]
        enqueue(stack, *(["--flow", FLOW, "--node", node_id] for node_id in scripts))
        wait_terminal(stack, len(scripts))
        enqueue(stack, *(["--flow", FLOW, "--node", node_id] for node_id in NODES if node_id not in scripts),
                ["--flow", DEMO_AGENT_FLOW, "--kind", "agent"])
        before = wait_terminal(stack, len(NODES) + 1)

    nodes = before["nodes"]
    assert nodes["python-script"]["result"] == {"sum": 42, "proc": False}  # the container profile
    assert nodes["js-script"]["result"] == [2, 4, 6]
    assert nodes["math"]["result"] == 120 and nodes["counter"]["text"] == "42"
    assert json.loads(nodes["sql"]["text"]) == [{"two": 2}]
    assert "dagster_webserver_version" in nodes["api"]["text"]
    assert "youtube video=dQw4w9WgXcQ" in nodes["transcript"]["text"]  # offline: no SearchAPI key
    # Audio files are cut by ffmpeg in the run workers, i.e. in the daemon's container.
    assert "ffmpeg version" in stack.compose("exec", "-T", "flux_dagster_daemon", "ffmpeg", "-version").stdout
    assert before["charges"] >= 2  # the writer's tokens, the image's credit (each once)
    files_before = stack.python(FILES, service="flux_dagster_daemon")
    assert {Path(p).suffix for p in files_before} >= {".pdf", ".md", ".png"}, files_before
    runs_before = stack.graphql(RUNS)["data"]["runsOrError"]["results"]
    assert len(runs_before) == len(NODES) + 1 and {r["status"] for r in runs_before} == {"SUCCESS"}

    with timed("restart: down (volumes kept) + up"):
        stack.compose("down")
        stack.up()

    after = stack.python(STATE)
    assert after["rows"] == before["rows"] and after["charges"] == before["charges"]
    assert stack.python(FILES, service="flux_dagster_daemon") == files_before
    runs_after = stack.graphql(RUNS)["data"]["runsOrError"]["results"]
    assert sorted(r["runId"] for r in runs_after) == sorted(r["runId"] for r in runs_before)
    # The event logs (Postgres volume) are still there for the UI.
    run_id = runs_after[0]["runId"]
    logs = stack.graphql(f'{{ logsForRun(runId: "{run_id}") {{ ... on EventConnection {{ events {{ __typename }} }} }} }}')
    assert len(logs["data"]["logsForRun"]["events"]) > 10

    # And the worker still works after the restart, a script among the executions.
    with timed("after the restart: a script and a math function, enqueue → completed"):
        enqueue(stack, ["--flow", FLOW, "--node", "js-script"], ["--flow", FLOW, "--node", "math"])
        wait_terminal(stack, len(NODES) + 3)


def test_prometheus_scrapes_the_worker(stack):
    with timed("check: Prometheus scrapes the worker"):
        prometheus_scrapes_the_worker(stack)


def prometheus_scrapes_the_worker(stack):
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        status, text = stack.request(stack.prometheus_port, "/api/v1/targets")
        targets = {t["labels"]["job"]: t["health"] for t in json.loads(text)["data"]["activeTargets"]} \
            if status == 200 else {}
        if targets.get("flux-dagster") == "up":
            break
        assert time.monotonic() < deadline, (targets, stack.logs())
        time.sleep(3)
    status, text = stack.request(stack.prometheus_port, "/api/v1/label/__name__/values")
    names = set(json.loads(text)["data"])
    assert {"flux_queue_executions", "flux_executions_total", "flux_execution_latency_seconds_bucket"} <= names, names
    # Every metric family the Grafana dashboard queries is one the worker exposes (counters and
    # histograms without a sample yet are known from their metadata).
    status, text = stack.request(stack.prometheus_port, "/api/v1/metadata")
    families = set(json.loads(text)["data"])
    dashboard = json.loads((REPO / "docker" / "grafana" / "flux-dagster.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\b(flux_[a-z_]+)", target["expr"])}
    unknown = {n for n in used if n not in names and re.sub(r"_(total|bucket|sum|count)$", "", n) not in families}
    assert used and not unknown, (unknown, sorted(families))
