"""A real multi-node Ray cluster on loopback, for tests and benchmarks.

Ray binds a node to the machine's network address unless told otherwise; inside a network
namespace whose only interface is loopback (``unshare -n``, as CI runs the tests) every node
is started on ``127.0.0.1`` and nothing outside the machine can reach it. Each node is
started with ``ray start --block`` in its own session, so that one node can be killed
(SIGKILL to every process of its session) without touching the others, and teardown ends
exactly the processes the cluster started.

    with LoopbackCluster(nodes=2, tmp=tmp_path) as cluster:
        ...  # ExecutorConfig(kind="ray", address=cluster.address)
        cluster.kill_node(1)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 120.0


def only_loopback() -> bool:
    """Whether this process sees no network interface but loopback (a network namespace)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return False
    return names == ["lo"]


def loopback_up() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


class LoopbackCluster:
    """``nodes`` Ray nodes on 127.0.0.1 (``num_cpus`` each, dashboard off)."""

    def __init__(self, nodes: int = 2, num_cpus: int = 1, tmp: Path | None = None) -> None:
        if not only_loopback():
            raise RuntimeError(
                "LoopbackCluster runs only inside a network namespace with just loopback "
                "(e.g. `unshare -n sh -c 'ip link set lo up && ...'`): elsewhere Ray would "
                "bind the machine's network address"
            )
        self.nodes = nodes
        self.num_cpus = num_cpus
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's session directory holds Unix sockets, whose paths may not exceed 107 bytes:
        # a short directory of its own under /tmp (``tmp`` only keeps the nodes' logs).
        self.tmp = Path(tempfile.mkdtemp(prefix="ttray-", dir="/tmp"))
        self.logs = Path(tmp) if tmp is not None else self.tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.startup_s = 0.0
        self.ray = str(Path(sys.executable).with_name("ray"))

    def _start_node(self, index: int, private_mount: Path | None = None) -> None:
        common = [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.num_cpus),
            "--disable-usage-stats",
            "--block",
        ]
        if index == 0:
            args = [
                self.ray,
                "start",
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard=false",
                "--temp-dir",
                str(self.tmp),
                *common,
            ]
        else:
            args = [self.ray, "start", "--address", self.address, *common]
        if private_mount is not None:
            # The node sees its own empty filesystem at private_mount (a mount namespace):
            # what a node without the shared mount would see.
            script = 'mount -t tmpfs tracetune-private "$0" && exec "$@"'
            args = ["unshare", "-m", "sh", "-c", script, str(private_mount), *args]
        log = open(self.logs / f"ray-{self.port}-node{index}.log", "wb")  # noqa: SIM115
        # No token authentication: nothing but this machine can reach loopback in the
        # namespace, and a head that finds ~/.ray/auth_token would otherwise turn it on for
        # itself and refuse the other nodes.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        if index < len(self.procs):
            self.procs[index] = proc
        else:
            self.procs.append(proc)

    def _alive_nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive"))

    def start(self) -> LoopbackCluster:
        try:
            return self._start()
        except BaseException:  # interrupted or failed: no node is left running
            self.stop()
            raise

    def _start(self) -> LoopbackCluster:
        import ray

        t0 = time.monotonic()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._start_node(0)
        deadline = t0 + START_TIMEOUT_S
        while True:  # the head's GCS port answering
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the Ray head did not start; see {self.logs}") from None
                time.sleep(0.2)
        for i in range(1, self.nodes):
            self._start_node(i)
        while True:  # the GCS port answers a moment before the GCS serves clients
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                break
            except (RuntimeError, ConnectionError) as exc:
                if ray.is_initialized():
                    ray.shutdown()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot connect to the Ray head: {exc}") from None
                time.sleep(1.0)
        while (alive := self._alive_nodes()) < self.nodes:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"only {alive} of {self.nodes} Ray nodes started; see {self.logs}"
                )
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t0
        return self

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of node ``index`` (raylet, its workers and actors)."""
        sid = self.procs[index].pid
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[index].wait(timeout=30)

    def restart_node(self, index: int, private_mount: Path | None = None) -> None:
        """Kill node ``index`` if it runs, start it again, and wait until the cluster has
        all its nodes (``private_mount``: see ``_start_node``)."""
        if index == 0:
            raise ValueError("only a worker node can be restarted")
        if self.procs[index].poll() is None:
            self.kill_node(index)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._alive_nodes() >= self.nodes:  # the killed node marked dead first
            if time.monotonic() > deadline:
                raise RuntimeError("the killed Ray node is still listed as alive")
            time.sleep(0.2)
        self._start_node(index, private_mount)
        while self._alive_nodes() < self.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {index} did not come back")
            time.sleep(0.2)

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for index in reversed(range(len(self.procs))):
            if self.procs[index].poll() is None:
                self.kill_node(index)
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
