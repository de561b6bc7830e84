"""Real MLflow and Prefect servers as subprocesses on free loopback ports, for tests that need them.

Each is a context manager that stops what it started (the whole process group), also when the test
fails. Nothing here is a fake: the servers are the `mlflow` and `prefect` command lines of the venv.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from llmcore.environment import environ_copy

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class MlflowServer:
    """`mlflow server` over `<root>/mlruns` (SQLite backend, served artifacts), restartable on its port."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        (self.root / "mlruns").mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> None:
        log = self.root / "mlflow-server.log"
        command = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            "sqlite:///mlruns/mlflow.db",
            "--serve-artifacts",
            "--artifacts-destination",
            "mlruns/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.process = subprocess.Popen(
            command, cwd=self.root, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(f"{self.url}/health", timeout, self.process, log)

    def kill(self) -> None:
        """SIGKILL, as an outage would: no graceful shutdown."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process:
            stop(self.process)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` with its own PREFECT_HOME; yields the API URL."""
    port = free_port()
    log = Path(home) / "prefect-server.log"
    Path(home).mkdir(parents=True, exist_ok=True)
    env = environ_copy(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", 180, process, log)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(process)
