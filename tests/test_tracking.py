"""Tracking that never fails training, ghost runs, secrets, git tags: against real MLflow stores and servers.

The fast tests use a local SQLite store or a real `mlflow server` subprocess; the `flow` ones run the
pipeline command as a subprocess against a real MLflow server (killed and restarted mid-run, or with the
pipeline itself SIGKILLed) and a real Prefect server.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmcore.environment import environ_copy
from tests.servers import MlflowServer, prefect_server

ROOT = Path(__file__).resolve().parents[1]
SECRET = "planted-secret-123"


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    """A fresh working folder with its own mlruns/ store; returns the experiment id."""
    from tasks.tracking import experiment_id

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return experiment_id("tracking-test")


def _run(experiment: str, tags: dict[str, str] | None = None) -> str:
    from mlflow import MlflowClient

    return MlflowClient().create_run(experiment, tags=tags or {}).info.run_id


def test_params_skip_none_log_paths_relative_to_runs_and_mask_secrets(local_store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from llmcore.tracking import MlflowTracker

    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    run_id = _run(local_store)
    tracker = MlflowTracker(run_id, relative_to=tmp_path / "runs")
    tracker.log_params(
        {
            "finetune": {
                "max_length": None,
                "base_model": str(tmp_path / "runs" / "pretrain" / "a" / "model.pt"),
                "note": f"token={SECRET}",
            },
            "source": "/elsewhere/data",
        }
    )
    tracker.log_metrics({"pretrain/loss": 2.0}, step=1)
    tracker.log_metrics({"pretrain/loss": 1.0, "skipped": None}, step=2)
    assert tracker.close() == 0
    run = MlflowClient().get_run(run_id)
    assert run.data.params == {
        "finetune.base_model": "pretrain/a/model.pt",
        "finetune.note": "token=***",
        "source": "/elsewhere/data",
    }
    assert [m.value for m in MlflowClient().get_metric_history(run_id, "pretrain/loss")] == [2.0, 1.0]
    assert "skipped" not in run.data.metrics


def test_params_are_logged_while_another_thread_changes_the_environment(local_store, monkeypatch):
    """MLflow's telemetry thread unsets a variable while params are logged. Masking secrets iterated the live
    environment and raised KeyError (it stopped 2 of 10 pipeline runs, and every rerun after a kill); here a
    thread sets and removes a variable without pause, with the interpreter switching threads every 10 us."""
    from mlflow import MlflowClient

    from llmcore.tracking import MlflowTracker

    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    tracker = MlflowTracker(_run(local_store))
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["_LLM_PIPELINE_CHURN"] = "x"
            os.environ.pop("_LLM_PIPELINE_CHURN", None)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for i in range(500):
            tracker.log_params({f"p{i}": f"value {i} {SECRET}"})
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert tracker.close() == 0
    params = MlflowClient().get_run(tracker.run_id).data.params
    assert params == {f"p{i}": f"value {i} ***" for i in range(500)}


def test_a_refused_record_goes_to_the_fallback_file_and_the_rest_is_delivered(local_store, tmp_path):
    from mlflow import MlflowClient

    from llmcore.tracking import MlflowTracker

    run_id = _run(local_store)
    tracker = MlflowTracker(run_id)
    tracker.log_params({"lr": 1})
    tracker.log_params({"lr": 2})  # MLflow params are immutable: the store refuses this one
    tracker.log_metrics({"loss": 3.0}, step=1)
    assert tracker.close() == 1
    records = [
        json.loads(line)
        for line in (tmp_path / "mlruns" / "fallback" / f"{run_id}.jsonl").read_text().splitlines()
    ]
    assert records == [{"run_id": run_id, "kind": "param", "value": ["lr", "2"]}]
    assert MlflowClient().get_run(run_id).data.metrics == {"loss": 3.0}


def test_metrics_survive_a_server_outage_and_what_cannot_be_sent_is_filed(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from llmcore.tracking import MlflowTracker

    # MLflow's own HTTP retries would hold a failed request for two minutes here; the tracker tries each
    # request once and retries on its own schedule, which close() cuts short once the server is back.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "60")
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        mlflow.set_tracking_uri(server.url)
        client = MlflowClient()
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        tracker = MlflowTracker(run_id, fallback=tmp_path / "fallback.jsonl")
        tracker.log_metrics({"loss": 10.0}, step=0)
        server.kill()
        for step in range(1, 6):  # returns at once: nothing waits for the server
            tracker.log_metrics({"loss": 10.0 - step}, step=step)
        time.sleep(2)  # the sender has met the outage
        server.start()
        assert tracker.close(timeout=30) == 0
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(6))

        tracker = MlflowTracker(run_id, fallback=tmp_path / "fallback.jsonl")
        server.kill()
        tracker.log_metrics({"loss": 0.5}, step=6)
        assert tracker.close(timeout=3) == 1  # the server stayed down: filed, not lost, not raised
        (record,) = [json.loads(line) for line in (tmp_path / "fallback.jsonl").read_text().splitlines()]
        assert record["kind"] == "metric" and record["value"][:2] == ["loss", 0.5] and record["value"][3] == 6
    finally:
        server.stop()


def test_queued_records_are_delivered_before_a_failed_run_is_ended(local_store):
    from mlflow import MlflowClient

    from llmcore.tracking import MlflowTracker
    from tasks.tracking import mlflow_run

    with pytest.raises(RuntimeError), mlflow_run("tracking-test", "fails") as run_id:
        tracker = MlflowTracker(run_id)
        for step in range(1, 51):
            tracker.log_metrics({"pretrain/loss": 1.0 / step}, step=step)
        raise RuntimeError("diverged")
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FAILED"
    assert len(client.get_metric_history(run_id, "pretrain/loss")) == 50


def test_git_tags_name_the_commit_and_dirty_flag_and_nothing_outside_a_checkout(tmp_path):
    from tasks.tracking import git_tags

    assert git_tags(tmp_path) == {}
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_tags(tmp_path) == {"mlflow.source.git.commit": head, "git.dirty": "false"}
    (tmp_path / "a.txt").write_text("b")
    assert git_tags(tmp_path)["git.dirty"] == "true"


def test_runs_of_dead_processes_are_marked_killed_and_live_ones_are_left(local_store):
    from mlflow import MlflowClient

    from tasks.tracking import _process_tags, close_ghost_runs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ours = _process_tags()
    dead = _run(local_store, ours | {"pid": str(gone.pid)})
    reused_pid = _run(
        local_store, ours | {"pid_started": "1.00"}
    )  # our pid, but another process's start time
    alive = _run(local_store, ours)
    assert set(close_ghost_runs(local_store)) == {dead, reused_pid}
    client = MlflowClient()
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(reused_pid).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"


# --- the pipeline command against real servers ---------------------------------------------------------

TINY = [
    "--preset",
    "smoke",
    "--max-corpus-bytes",
    "300000",
    "--vocab-size",
    "512",
    "--block-size",
    "64",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--batch-size",
    "4",
    "--finetune-steps",
    "3",
    "--device",
    "cpu",
    "--experiment",
    "faults",
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server and an MLflow server (restartable on its port) for the pipeline subprocesses."""
    root = tmp_path_factory.mktemp("faults")
    mlflow_server = MlflowServer(root / "mlflow")
    mlflow_server.start()
    try:
        with prefect_server(root / "prefect-home") as prefect_api:
            yield root, mlflow_server, prefect_api
    finally:
        mlflow_server.stop()


def _pipeline(
    root: Path, server: MlflowServer, prefect_api: str, args: list[str], workdir: str
) -> subprocess.Popen:
    env = {k: v for k, v in environ_copy().items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": server.url,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "MY_API_TOKEN": SECRET + "-token",
    }
    cwd = root / workdir
    cwd.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", *TINY, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_line(process: subprocess.Popen, text: str, lines: list[str]) -> None:
    """Read the process's output until a line contains `text` (keeping every line in `lines`)."""
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed; exit {process.wait()}:\n{''.join(lines[-60:])}")


@pytest.mark.flow
def test_pipeline_survives_an_mlflow_outage_mid_training_and_leaks_no_secret(servers):
    import mlflow
    from mlflow import MlflowClient

    root, server, prefect_api = servers
    process = _pipeline(root, server, prefect_api, ["--max-steps", "1500", "--seed", "1"], "outage")
    lines: list[str] = []
    try:
        _wait_for_line(process, "pretrain step", lines)
        server.kill()
        down = time.time() * 1000
        time.sleep(5)  # training goes on while the server is down
        server.start()
        up = time.time() * 1000
        drain = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        drain.start()
        assert process.wait(timeout=900) == 0, "".join(lines[-80:])
        drain.join(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (root / "outage" / "mlruns" / "fallback").exists()  # everything reached the server after all

    mlflow.set_tracking_uri(server.url)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(
        r for r in runs if r.data.tags.get("stage") == "pipeline" and r.data.params["pretrain.seed"] == "1"
    )
    children = {
        r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert parent.info.run_name.startswith("pipeline-smoke-stdlib-") and parent.info.status == "FINISHED"
    label = parent.info.run_name.removeprefix("pipeline-")
    assert {r.info.run_name for r in children.values()} == {f"{stage}-{label}" for stage in children}
    pretrain = children["pretrain"]
    assert pretrain.info.status == "FINISHED"
    total, every = (
        int(pretrain.data.params["pretrain.total_steps"]),
        int(pretrain.data.params["pretrain.log_interval"]),
    )
    history = client.get_metric_history(pretrain.info.run_id, "pretrain/loss")
    assert [m.step for m in history] == sorted(
        {s for s in range(every, total + 1, every)} | {total}
    )  # whole curve
    assert any(down <= m.timestamp <= up for m in history), "no step was logged while the server was down"
    assert any(key.startswith("system/") for key in pretrain.data.metrics)
    assert (
        parent.data.tags["corpus"].startswith("stdlib") and parent.data.params["pretrain.max_steps"] == "1500"
    )
    assert not any(v == "None" for r in runs for v in r.data.params.values())

    # No planted secret in any param, tag, metric name, artifact or logged model: read every stored byte.
    for r in runs:
        assert SECRET not in json.dumps([r.data.params, r.data.tags])
    stored = [p for p in (server.root / "mlruns").rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in stored)
    for path in stored:
        assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.flow
def test_runs_of_a_killed_pipeline_are_marked_killed_by_the_next_run(servers, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking import mlflow_run

    root, server, prefect_api = servers
    process = _pipeline(root, server, prefect_api, ["--max-steps", "3000", "--seed", "2"], "killed")
    lines: list[str] = []
    try:
        _wait_for_line(process, "pretrain step", lines)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole process tree, as kill -9 would
        process.wait()
    mlflow.set_tracking_uri(server.url)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("faults").experiment_id
    ghosts = {r.info.run_id for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")}
    assert len(ghosts) >= 2  # the pipeline's parent run and its pretraining run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    with mlflow_run("faults", "next") as next_run:
        pass
    assert {client.get_run(run_id).info.status for run_id in ghosts} == {"KILLED"}
    assert client.get_run(next_run).info.status == "FINISHED"
