"""The embedded script runner: each script runs once in a throwaway bubblewrap sandbox.

What a script can reach, and how that is enforced (everything on this worker runs as one user,
so the boundary must be the kernel's namespaces, not file permissions):

- no network: its own network namespace holds only a loopback of its own;
- no worker process: its own PID namespace, with a fresh /proc that lists only the sandbox,
  whose PID 1 is the interpreter itself (``--as-pid-1``): when it ends, or is killed at the
  timeout, the kernel kills whatever the script left behind before bwrap returns;
- no worker file: its own mount namespace holds, read-only, /usr (and the /bin, /lib links),
  the interpreter, /sandbox with the wrapper and the event, /dev's basic nodes, and /proc; the
  one writable place is a fresh size-capped tmpfs as /tmp, the working directory, gone with
  the namespace;
- no worker secret: bwrap starts with an empty environment and ``--clearenv``; only PATH, HOME
  and LANG are set;
- limits: wall-clock timeout (the whole namespace is killed), RLIMIT_DATA for memory (not
  RLIMIT_AS: V8 reserves more address space than 512 MB before running anything), RLIMIT_NPROC
  against fork bombs, RLIMIT_FSIZE and the wrappers' caps on console output and on the result,
  no core dumps, no nested user namespaces, no capabilities;
- when the worker runs as root, the sandbox runs as a fresh unprivileged uid: root would be
  exempt from RLIMIT_NPROC, and that uid owns nothing on the host.

Two profiles (``FLUX_SANDBOX_PROFILE``): ``host`` (default) is the above. ``container`` is for a
worker inside a Docker container, whose /proc is masked and /proc/sys read-only (Docker's default,
which compose cannot lift): the kernel then refuses the fresh /proc and bwrap cannot write the
nested-namespace limit. So the sandbox has no /proc at all (it sees no process, not even its own)
and nested user namespaces are left to the container's own limits; every other rule stays.
docs/containers.md says which container options it needs and what they cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from flux_dagster.errors import SystemError_
from flux_dagster.scripting import JAVASCRIPT, PYTHON, ScriptResponse

WRAPPERS = Path(__file__).parent / "wrappers"
MARKER = b"\x1eflux-script-response "

# Largest file the script may write (stdout and stderr included) and the size of its /tmp.
MAX_FILE_BYTES = 16 * 1024 * 1024
TMP_BYTES = 64 * 1024 * 1024
MAX_OPEN_FILES = 256
# Unprivileged uids for sandboxes started by root: far above any real account.
SANDBOX_UID_BASE = 1_600_000_000
SANDBOX_UID_SPAN = 100_000_000

_SYSTEM_DIR = Path("/usr")
_ROOT_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # links into /usr when merged
_MEMORY_SIGNS = ("out of memory", "Fatal process OOM", "MemoryError", "Cannot allocate memory")
PROFILES = ("host", "container")


class LocalSandboxRunner:
    name = "local-sandbox"

    def __init__(self, *, timeout_s: float = 30.0, memory_mb: int = 512, output_limit_bytes: int = 1_000_000,
                 max_processes: int = 64, profile: str = "host"):
        if profile not in PROFILES:
            raise SystemError_("The script sandbox is misconfigured.",
                               dev_message=f"unknown sandbox profile {profile!r} (one of {', '.join(PROFILES)})")
        self.profile = profile
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.output_limit_bytes = output_limit_bytes
        self.max_processes = max_processes

    def run(self, language: str, script: str, variables: list[dict[str, Any]]) -> ScriptResponse:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SystemError_(
                "The script sandbox is not available: bubblewrap (`bwrap`) is not installed on this worker.",
                dev_message="bwrap not found: install Debian's `bubblewrap` package, or configure the Lambda runner.",
            )
        prlimit = shutil.which("prlimit", path="/usr/bin:/bin")
        if prlimit is None:
            raise SystemError_("The script sandbox is not available: prlimit is not installed on this worker.",
                               dev_message="prlimit not found: install Debian's `util-linux` package.")
        command, wrapper = self._command(language)
        uid = SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_SPAN) if os.geteuid() == 0 else None
        with tempfile.TemporaryDirectory(prefix="flux-script-") as host_dir:
            code_dir = Path(host_dir, "code")
            code_dir.mkdir()
            shutil.copyfile(WRAPPERS / wrapper, code_dir / wrapper)
            event = {"script": script, "variables": variables,
                     "outputLimit": self.output_limit_bytes, "memoryMb": self.memory_mb}
            (code_dir / "event.json").write_text(json.dumps(event, default=str), encoding="utf-8")
            if uid is not None:  # bwrap, as that uid, must reach the code; nothing else may
                for path in (host_dir, code_dir, code_dir / wrapper, code_dir / "event.json"):
                    os.chown(path, uid, uid)
            argv = self._bwrap_argv(bwrap, prlimit, code_dir, command)
            stdout_path, stderr_path = Path(host_dir, "stdout"), Path(host_dir, "stderr")
            with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                timed_out = self._run(argv, out, err, uid)
            if timed_out:
                return ScriptResponse(error=f"The script exceeded its {self.timeout_s:g} s time limit")
            return self._response(stdout_path.read_bytes(), stderr_path.read_bytes())

    def _command(self, language: str) -> tuple[list[str], str]:
        """The interpreter command inside the sandbox, and the wrapper file it runs."""
        if language == PYTHON:
            python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)
            return [python, "-I", "/sandbox/python_runner.py", "/sandbox/event.json"], "python_runner.py"
        if language == JAVASCRIPT:
            node = shutil.which("node")
            if node is None:
                raise SystemError_(
                    "JavaScript scripts cannot run on this worker: Node.js is not installed.",
                    dev_message="`node` is not on the PATH: install Node.js, or configure the Lambda runner.",
                )
            # V8's heap limit below the memory cap, so a heap bomb ends with V8's clear message.
            heap_mb = self.memory_mb * 3 // 4
            return [os.path.realpath(node), f"--max-old-space-size={heap_mb}", "/sandbox/js_runner.js",
                    "/sandbox/event.json"], "js_runner.js"
        raise SystemError_(f"No sandbox wrapper for the language {language!r}.")

    def _bwrap_argv(self, bwrap: str, prlimit: str, code_dir: Path, command: list[str]) -> list[str]:
        argv = [
            bwrap,
            "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1",
            *(["--disable-userns"] if self.profile == "host" else []),
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8",
            "--ro-bind", str(_SYSTEM_DIR), str(_SYSTEM_DIR),
        ]
        for path in _ROOT_DIRS:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        interpreter = Path(os.path.realpath(command[0]))
        if not any(interpreter.is_relative_to(d) for d in (_SYSTEM_DIR, *_ROOT_DIRS)):
            # An interpreter installed elsewhere (pyenv, nvm): its own prefix only, read-only.
            prefix = interpreter.parent.parent
            if prefix == Path("/"):
                raise SystemError_("The script interpreter cannot be sandboxed.",
                                   dev_message=f"{interpreter} is not under an install prefix")
            argv += ["--ro-bind", str(prefix), str(prefix)]
        argv += [
            *(["--proc", "/proc"] if self.profile == "host" else []),
            "--dev", "/dev", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
            "--ro-bind", str(code_dir), "/sandbox",
            # bwrap's own tmpfs for / and /dev have no size cap: read-only, /tmp is the one place to write.
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
            "--", prlimit, f"--data={self.memory_mb * 1024 * 1024}", f"--nproc={self.max_processes}",
            f"--fsize={MAX_FILE_BYTES}", "--core=0", f"--nofile={MAX_OPEN_FILES}", "--", *command,
        ]
        return argv

    def _run(self, argv: list[str], out, err, uid: int | None) -> bool:
        """Run bwrap to the end or to the timeout; True when it timed out."""
        ids: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        info_read, info_write = os.pipe()  # bwrap tells the sandbox's host pid through it
        try:
            proc = subprocess.Popen([argv[0], "--info-fd", str(info_write), *argv[1:]], pass_fds=(info_write,),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={}, cwd="/",
                                    start_new_session=True, **ids)
        finally:
            os.close(info_write)
        with open(info_read, "rb") as info:  # written once the sandbox exists, then closed
            sandbox_pid = json.loads(info.read() or b"{}").get("child-pid")
        try:
            proc.wait(timeout=self.timeout_s)
            return False
        except subprocess.TimeoutExpired:
            return True
        finally:
            if proc.poll() is None:
                # Kill the namespace's PID 1: the kernel then kills every process in it before bwrap
                # sees PID 1 exit, so nothing of the script outlives this call.
                with contextlib.suppress(ProcessLookupError):
                    if sandbox_pid:
                        os.kill(sandbox_pid, signal.SIGKILL)
                    else:  # bwrap failed before it started the sandbox
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _response(self, stdout: bytes, stderr: bytes) -> ScriptResponse:
        start = stdout.rfind(b"\n" + MARKER)
        if start >= 0:
            line = stdout[start + 1 + len(MARKER):].split(b"\n", 1)[0]
            try:
                return ScriptResponse.from_payload(json.loads(line))
            except ValueError:
                pass  # cut short: judged below like a missing answer
        if len(stdout) >= MAX_FILE_BYTES or len(stderr) >= MAX_FILE_BYTES:
            return ScriptResponse(error=f"The script's output exceeded the {self.output_limit_bytes}-byte limit")
        detail = stderr.decode("utf-8", "replace").strip()[-2000:]
        if detail.startswith("bwrap:"):
            raise SystemError_("The script sandbox could not start.", dev_message=detail)
        if any(sign in detail for sign in _MEMORY_SIGNS):
            return ScriptResponse(error=f"The script ran out of memory (limit {self.memory_mb} MB)")
        return ScriptResponse(error="The script ended without a result" + (f": {detail}" if detail else ""))
