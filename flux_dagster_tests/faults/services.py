"""Private Postgres and Redis servers for the fault suite: started on free loopback ports in temp
dirs, stopped and restarted by PID. The machine's shared servers are never touched."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from flux_dagster_tests.deployment import free_port, wait_for_port


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    return found[-1]


class PrivatePostgres:
    """A throwaway cluster (initdb) owned by the ``postgres`` user when run as root (initdb
    refuses root). Durability is off: it only has to survive the tests, not a power cut."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="flux-faults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self._as, _pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                       "max_connections = 400\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                       "shared_buffers = 64MB\n")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def start(self) -> None:
        subprocess.run([*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                        "start"], check=True, capture_output=True)
        wait_for_port(self.port, None, 30, self.log)

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster): every connection drops, as in a crash."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A ``redis-server`` without persistence. ``kill()`` takes it away, ``start()`` brings it
    back on the same port: first on a unix socket only, so the test's subscriber is listening
    again before any worker can publish, then on the TCP port (``CONFIG SET port``)."""

    CHANNEL = "room_status_updated"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="flux-faults-redis-"))
        self.port = free_port()
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen | None = None
        self.messages: list[dict] = []
        self._subscribed = threading.Event()
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._subscribed.clear()  # before the server exists: the listener may subscribe at once
        self.process = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, daemon=True)
            self._listener.start()
        if not self._subscribed.wait(20):
            raise RuntimeError("could not subscribe to the private redis")
        import redis

        client = redis.Redis(unix_socket_path=str(self.socket))
        client.config_set("port", self.port)
        client.close()

    def _listen(self) -> None:
        import redis

        while not self._closing.is_set():
            try:
                client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=None)
                pubsub = client.pubsub()
                pubsub.subscribe(self.CHANNEL)
                for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                    elif message["type"] == "message":
                        self.messages.append(json.loads(message["data"]))
            except (redis.RedisError, OSError, ValueError):
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        self._closing.set()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
