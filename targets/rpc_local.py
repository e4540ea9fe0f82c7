"""A TVM RPC tracker and servers on this machine (loopback), for tuning with several measuring servers.

    with LoopbackCluster(servers=2, key="x86") as c:
        qcompile tune MODEL --tracker c.tracker --key x86
        c.kill(0)      # a server lost mid-run: its session fails, the others go on

The processes are ``python -m tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server --tracker ...``,
exactly as on real devices; ports are chosen free when they start. Each server runs in its own process
group (it forks a process per session), so :meth:`LoopbackCluster.kill` ends the server and its session.
Each server's log (``connected from ...`` per session) is kept, to see how the trials spread.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LoopbackCluster", "free_port"]

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """A tracker and ``servers`` RPC servers registered under ``key``, all on 127.0.0.1."""

    def __init__(self, servers: int, key: str = "local", start_timeout_s: float = 120.0, keep_logs: bool = False):
        self.key = key
        self.keep_logs = keep_logs  # else the logs go when the context exits (read sessions() before)
        self.n_servers = servers
        self.start_timeout_s = start_timeout_s
        self.logs = Path(tempfile.mkdtemp(prefix="qcompile-rpc-"))
        self.tracker_proc: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen | None] = []
        self.port = 0

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        out = open(self.logs / log_name, "wb")  # noqa: SIM115 - kept open for the process's life
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)

    def start(self) -> "LoopbackCluster":
        self.port = free_port()
        self.tracker_proc = self._spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                                         "--port-end", str(self.port + 1)], "tracker.log")
        for i in range(self.n_servers):
            p = free_port()
            self.servers.append(self._spawn(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(p),
                                             "--port-end", str(p + 1), "--tracker", self.tracker, "--key",
                                             self.key], f"server{i}.log"))
        self.wait_registered(self.n_servers)
        log.info("RPC tracker %s with %d servers under key %r (logs in %s)", self.tracker, self.n_servers,
                 self.key, self.logs)
        return self

    def registered(self) -> int:
        """Servers the tracker has under our key now."""
        from tvm import rpc  # noqa: PLC0415

        summary = rpc.connect_tracker("127.0.0.1", self.port).summary()
        return sum(1 for s in summary["server_info"] if s.get("key") == f"server:{self.key}")

    def wait_registered(self, n: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            procs = [("tracker", self.tracker_proc)] + [(f"server{i}", p) for i, p in enumerate(self.servers)]
            dead = [name for name, p in procs if p is not None and p.poll() is not None]
            if dead:
                tail = (self.logs / f"{dead[0]}.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise RuntimeError(f"RPC cluster: {dead[0]} exited at start:\n{tail}")
            try:
                if self.registered() >= n:
                    return
            except (OSError, RuntimeError, ConnectionError):
                pass  # the tracker is not listening yet
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"RPC cluster: fewer than {n} servers registered after {self.start_timeout_s} s "
                                   f"(logs in {self.logs})")
            time.sleep(0.5)

    def sessions(self, i: int) -> int:
        """Sessions server ``i`` has served (started) so far, from its log."""
        path = self.logs / f"server{i}.log"
        return path.read_text(errors="replace").count("connected from") if path.exists() else 0

    def kill(self, i: int) -> None:
        """Kill server ``i`` and its session process at once (SIGKILL to its process group)."""
        proc = self.servers[i]
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self.servers[i] = None
        log.info("killed RPC server %d (pid %d)", i, proc.pid)

    def stop(self) -> None:
        for i in range(len(self.servers)):
            self.kill(i)
        if self.tracker_proc is not None:
            try:
                os.killpg(self.tracker_proc.pid, signal.SIGTERM)
                self.tracker_proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.tracker_proc.pid, signal.SIGKILL)
                self.tracker_proc.wait()
            self.tracker_proc = None

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if not self.keep_logs:
            shutil.rmtree(self.logs, ignore_errors=True)
