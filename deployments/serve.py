"""Bring up, on 127.0.0.1, everything the deployments need; tear it down again.

    python deployments/serve.py up     # `make serve`: Prefect server, MLflow server, pool, worker,
                                       # deployments
    python deployments/serve.py down   # `make down`: stop what `up` started (from its pid files)

`up` starts a Prefect server, an MLflow server over `mlruns/` that serves artifacts, creates the process
work pool and the `gpu` global concurrency limit (1 slot), checks every cron in prefect.yaml, applies
every deployment, starts a worker whose flow runs log to the MLflow server (with the `llmcore` logger
forwarded to the Prefect UI), prints the URLs and waits; Ctrl-C stops everything it started. Each
process runs in its own process group, recorded in STATE/pids/<name>.pid. Ports come from
PREFECT_PORT and MLFLOW_PORT (or --prefect-port/--mlflow-port). This script does not run flows.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HOME = Path(__file__).resolve().parents[1]
PREFECT_FILE = HOME / "deployments" / "prefect.yaml"
POOL = "local"
GPU_LIMIT = "gpu"


class ServeError(Exception):
    """A one-line reason why the services could not be brought up."""


@dataclass
class Services:
    """Where things live and which ports they use; `env` is what every child process gets."""

    state: Path
    mlruns: Path
    prefect_port: int
    mlflow_port: int
    started: list[str] = field(default_factory=list)

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_HOME": str(self.state / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "LLM_PIPELINE_HOME": str(HOME),
            "PREFECT_LOGGING_EXTRA_LOGGERS": "llmcore",
            "PYTHONPATH": os.pathsep.join(p for p in (str(HOME), os.environ.get("PYTHONPATH")) if p),
        }

    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"


def bin_path(name: str) -> str:
    """A console script of the running interpreter's environment (works without an activated venv)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def start(services: Services, name: str, argv: list[str]) -> subprocess.Popen:
    """Start a long-running process in its own group, logging to STATE/logs/<name>.log, pid recorded."""
    for folder in ("pids", "logs"):
        (services.state / folder).mkdir(parents=True, exist_ok=True)
    log = open(services.state / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(
        argv, env=services.env(), cwd=HOME, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    services.pid_file(name).write_text(str(process.pid))
    services.started.append(name)
    return process


def wait_healthy(url: str, process: subprocess.Popen, name: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise ServeError(f"{name} exited with code {process.returncode} ({' '.join(tail)}): see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServeError(f"{name} did not answer {url} within {timeout:.0f} s: see {log}")


def run(services: Services, *argv: str) -> str:
    done = subprocess.run(argv, env=services.env(), cwd=HOME, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise ServeError(f"`{' '.join(argv[1:])}` failed: {last[0]}")
    return done.stdout


def check_crons(path: Path) -> None:
    """Every schedule's cron string is valid, or one line naming the deployment and the string."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    for deployment in yaml.safe_load(path.read_text()).get("deployments", []):
        for schedule in deployment.get("schedules") or []:
            cron = schedule.get("cron")
            if cron is None:
                continue
            try:
                CronSchedule(cron=str(cron), timezone=schedule.get("timezone"))
            except ValidationError:
                raise ServeError(
                    f"{path}: deployment {deployment.get('name')!r} has an invalid cron {cron!r}: "
                    "use five fields, minute hour day-of-month month day-of-week (e.g. '0 2 * * *')"
                ) from None


def up(services: Services, prefect_file: Path, wait: bool) -> None:
    check_crons(prefect_file)
    services.mlruns.mkdir(parents=True, exist_ok=True)
    prefect = start(
        services,
        "prefect-server",
        [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(services.prefect_port)],
    )
    mlflow = start(
        services,
        "mlflow-server",
        [
            bin_path("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(services.mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{services.mlruns.resolve() / 'mlflow.db'}",
            "--artifacts-destination",
            str(services.mlruns.resolve() / "artifacts"),
            "--serve-artifacts",
        ],
    )
    wait_healthy(
        f"{services.prefect_api}/health",
        prefect,
        "Prefect server",
        services.state / "logs/prefect-server.log",
    )
    wait_healthy(
        f"{services.mlflow_uri}/health", mlflow, "MLflow server", services.state / "logs/mlflow-server.log"
    )
    prefect_cli = bin_path("prefect")
    run(services, prefect_cli, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    if GPU_LIMIT not in run(services, prefect_cli, "gcl", "ls"):
        run(services, prefect_cli, "gcl", "create", GPU_LIMIT, "--limit", "1")
    run(services, prefect_cli, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    start(services, "worker", [prefect_cli, "worker", "start", "--pool", POOL, "--type", "process"])
    print(
        f"Prefect UI  http://127.0.0.1:{services.prefect_port}\nMLflow UI   {services.mlflow_uri}\n"
        f"state       {services.state} (logs/, pids/)\nready",
        flush=True,
    )
    if wait:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)


def down(state: Path) -> list[str]:
    """Stop every process group recorded under STATE/pids (worker first), remove the pid files."""
    stopped = []
    order = {"worker": 0, "mlflow-server": 1, "prefect-server": 2}
    for pid_file in sorted((state / "pids").glob("*.pid"), key=lambda p: order.get(p.stem, 9)):
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(pid_file.stem)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    return stopped


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie leader of our own still answers signal 0; reap it
        return os.waitpid(pgid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deployments/serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument(
        "--state", type=Path, default=HOME / ".serve", help="pid files, logs, Prefect's database"
    )
    parser.add_argument(
        "--mlruns", type=Path, default=HOME / "mlruns", help="the MLflow store the server serves"
    )
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", "4200")))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", "5000")))
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_FILE)
    parser.add_argument(
        "--no-wait", action="store_true", help="return once everything is up (then use `down`)"
    )
    args = parser.parse_args(argv)
    state = args.state.resolve()
    if args.command == "down":
        print("stopped: " + (", ".join(down(state)) or "nothing was running"))
        return
    if any((state / "pids").glob("*.pid")):
        print(
            f"error: services from {state} may still run: `make down` (serve.py down) first", file=sys.stderr
        )
        raise SystemExit(2)
    services = Services(state, args.mlruns, args.prefect_port, args.mlflow_port)
    try:
        up(services, args.prefect_file.resolve(), wait=not args.no_wait)
    except ServeError as error:
        down(state)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, SystemExit):
        print("stopped: " + ", ".join(down(state)))


if __name__ == "__main__":
    main(sys.argv[1:])
