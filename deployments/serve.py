"""Bring up, on 127.0.0.1, everything the deployments need; tear it down again.

    python deployments/serve.py up     # `make serve`: Prefect server, MLflow server, pool, worker,
                                       # deployments
    python deployments/serve.py down   # `make down`: stop what `up` started (from its pid files)

`up` starts a Prefect server, an MLflow server over `mlruns/` that serves artifacts, creates the process
work pool and the `gpu` global concurrency limit (1 slot), checks every cron in prefect.yaml, applies
every deployment, starts a worker whose flow runs log to the MLflow server (with the `llmcore` logger
forwarded to the Prefect UI), prints the URLs and waits; Ctrl-C, or `down` from another shell, stops
everything it started. Each process runs in its own process group, recorded in STATE/pids/<name>.pid;
the waiting `up` itself is recorded in STATE/serve.pid, and `down` asks it to stop (it exits 0) before
stopping whatever is left. The Prefect server keeps its concurrency leases on disk (PREFECT_HOME), so the
`gpu` slot a training holds is released even if the server restarted meanwhile. Ports come from
PREFECT_PORT and MLFLOW_PORT (or --prefect-port/--mlflow-port). This script does not run flows.
"""

import argparse
import contextlib
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
SERVE_PID = "serve.pid"  # under STATE: the `up` that waits in the foreground (`make serve`)


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
            # Leases in the server's memory die with it: a training that held the `gpu` slot across a
            # server restart could not release it, and every later training would wait for it forever.
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
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


def start_prefect_server(services: Services) -> None:
    """The Prefect server on its port and database (STATE/prefect), started and answering."""
    prefect = start(
        services,
        "prefect-server",
        [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(services.prefect_port)],
    )
    wait_healthy(
        f"{services.prefect_api}/health",
        prefect,
        "Prefect server",
        services.state / "logs/prefect-server.log",
    )


def start_mlflow_server(services: Services) -> None:
    """The MLflow server over `mlruns/` (SQLite store, served artifacts), started and answering."""
    services.mlruns.mkdir(parents=True, exist_ok=True)
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
        f"{services.mlflow_uri}/health", mlflow, "MLflow server", services.state / "logs/mlflow-server.log"
    )


def start_worker(services: Services) -> None:
    start(services, "worker", [bin_path("prefect"), "worker", "start", "--pool", POOL, "--type", "process"])


def up(services: Services, prefect_file: Path, wait: bool) -> None:
    check_crons(prefect_file)
    start_prefect_server(services)
    start_mlflow_server(services)
    prefect_cli = bin_path("prefect")
    run(services, prefect_cli, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    if GPU_LIMIT not in run(services, prefect_cli, "gcl", "ls"):
        run(services, prefect_cli, "gcl", "create", GPU_LIMIT, "--limit", "1")
    run(services, prefect_cli, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    start_worker(services)
    print(
        f"Prefect UI  http://127.0.0.1:{services.prefect_port}\nMLflow UI   {services.mlflow_uri}\n"
        f"state       {services.state} (logs/, pids/)\nready",
        flush=True,
    )
    if wait:
        while True:
            time.sleep(3600)


def down(state: Path) -> list[str]:
    """Stop a waiting `up` (which stops what it started), then every process group still recorded under
    STATE/pids (worker first); remove the pid files. Returns what was stopped, by name."""
    stopped = []
    up_pid = _serving(state)
    if up_pid is not None and up_pid != os.getpid():
        names = sorted(p.stem for p in (state / "pids").glob("*.pid"))
        os.kill(up_pid, signal.SIGTERM)
        deadline = time.monotonic() + 90  # it stops each group within 15 s
        while time.monotonic() < deadline and _serving(state) == up_pid:
            time.sleep(0.2)
        stopped += ["serve.py up"] + [n for n in names if not (state / "pids" / f"{n}.pid").exists()]
    order = {"worker": 0, "mlflow-server": 1, "prefect-server": 2}
    for pid_file in sorted((state / "pids").glob("*.pid"), key=lambda p: order.get(p.stem, 9)):
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            if not _wait_gone(pid, 15):
                os.killpg(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
            stopped.append(pid_file.stem)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    if _serving(state) in (None, os.getpid()):
        (state / SERVE_PID).unlink(missing_ok=True)
    return stopped


def _record_serving(state: Path) -> None:
    """STATE/serve.pid: this process's pid and start (a reused pid is never taken for it)."""
    state.mkdir(parents=True, exist_ok=True)
    (state / SERVE_PID).write_text(f"{os.getpid()} {_started(os.getpid())[0]}")


def _serving(state: Path) -> int | None:
    """The pid of the `up` recorded in STATE/serve.pid while it runs (not once it exited or is a zombie)."""
    try:
        pid, started = (state / SERVE_PID).read_text().split()
        if _started(int(pid)) == (started, False):
            return int(pid)
    except (OSError, ValueError):
        pass
    return None


def _started(pid: int) -> tuple[str, bool]:
    """When process `pid` started, in clock ticks since boot, and whether it is a zombie, from
    /proc/<pid>/stat. A start time on the wall clock (psutil's) moves when the clock is adjusted or the
    machine resumes from a pause, and then no longer matches the one recorded."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3, the state
    return fields[19], fields[0] == "Z"


def _alive(pgid: int) -> bool:
    """Whether a running process of the group is left (a server's workers can outlive their leader). A
    zombie holds nothing and only waits for its parent to read its status: ours is reaped, another's (a
    process that restarted a service) does not count."""
    import psutil

    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def _wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _alive(pgid):
        time.sleep(0.2)
    return not _alive(pgid)


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
    if any((state / "pids").glob("*.pid")) or _serving(state):
        print(
            f"error: services from {state} may still run: `make down` (serve.py down) first", file=sys.stderr
        )
        raise SystemExit(2)
    services = Services(state, args.mlruns, args.prefect_port, args.mlflow_port)
    if not args.no_wait:
        _record_serving(state)
    # `down` from another shell sends SIGTERM: stop like Ctrl-C, once (a second signal cannot interrupt it)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        up(services, args.prefect_file.resolve(), wait=not args.no_wait)
    except ServeError as error:
        _ignore_stop_signals()
        down(state)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, SystemExit):
        _ignore_stop_signals()
        print("stopped: " + ", ".join(down(state)), flush=True)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main(sys.argv[1:])
