"""Faults of the services around a deployment run: the Prefect server and the MLflow server killed -9 and
started again on the same port and store, the worker killed -9, and two pipelines writing to one SQLite
store at once. The services are the real ones `make serve` starts (deployments/serve.py, restarted with its
own functions); every run is the tiny preset, and every interrupted run must end with the weights and
metrics of one uninterrupted run.

    pytest -m "servers and faults" tests/test_service_faults.py
"""

import glob
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.artifacts import MANIFEST, read_json
from llmcore.environment import environ_copy
from tests.servers import free_port
from tests.tiny_run import assert_same_weights

pytestmark = [pytest.mark.servers, pytest.mark.faults]

ROOT = Path(__file__).parents[1]
PARAMS = dict(preset="tiny", device="cpu", seed=3)  # 30 pretraining steps, a checkpoint every 15
FIRST_CHECKPOINT = "pretrain/*/checkpoints/step_000015.json"
EXPERIMENT = "llm-pipeline-nightly"
spec = importlib.util.spec_from_file_location("serve", ROOT / "deployments" / "serve.py")
serve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """`serve.py up --no-wait` on free ports; `serve.py down` at the end, whatever happened."""
    state = tmp_path_factory.mktemp("serve")
    services = serve.Services(state, state / "mlruns", free_port(), free_port())
    argv = [sys.executable, str(ROOT / "deployments" / "serve.py")]
    ports = ["--prefect-port", str(services.prefect_port), "--mlflow-port", str(services.mlflow_port)]
    try:
        done = subprocess.run(
            [*argv, "up", "--no-wait", "--state", str(state), "--mlruns", str(services.mlruns), *ports],
            env=environ_copy(PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=420,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        yield services
    finally:
        subprocess.run([*argv, "down", "--state", str(state)], timeout=300)


def client(services):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: services.prefect_api}):
        return get_client(sync_client=True)


def start_run(services, runs: Path) -> str:
    with client(services) as c:
        deployment = c.read_deployment_by_name("pipeline/nightly-cpu")
        return str(
            c.create_flow_run_from_deployment(deployment.id, parameters=PARAMS | {"runs_dir": str(runs)}).id
        )


def final_state(services, run_id: str, limit: float = 300) -> str:
    """The flow run's final state name, polling through server outages; fails after `limit` seconds."""
    deadline, slots = time.monotonic() + limit, "unknown"
    while time.monotonic() < deadline:
        try:
            with client(services) as c:
                state = c.read_flow_run(run_id).state
                slots = c.read_global_concurrency_limit_by_name(serve.GPU_LIMIT).active_slots
            if state.is_final():
                return state.name
        except Exception:  # the server is down or starting: ask again
            pass
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not final after {limit:.0f} s (gpu slots in use: {slots})")


def wait_for(runs: Path, pattern: str, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not glob.glob(str(runs / pattern)):
        assert time.monotonic() < deadline, f"no {pattern} under {runs} after {limit:.0f} s"
        time.sleep(0.05)


def kill(services, name: str) -> None:
    """SIGKILL the process group `serve.py` recorded for `name`, as a crash would."""
    os.killpg(int(services.pid_file(name).read_text()), signal.SIGKILL)


def stage_folder(runs: Path, stage: str) -> Path:
    (folder,) = (runs / stage).iterdir()
    return folder


@pytest.fixture(scope="module")
def reference(services, tmp_path_factory):
    """One uninterrupted run: the weights and metrics every interrupted one must end with."""
    runs = tmp_path_factory.mktemp("reference")
    assert final_state(services, start_run(services, runs)) == "Completed"
    return runs


def assert_whole_loss_curve(mlflow, pretrain) -> None:
    """Every logged point of the pretraining loss is in the store, once."""
    total, every = (int(pretrain.data.params[f"pretrain.{k}"]) for k in ("total_steps", "log_interval"))
    history = mlflow.get_metric_history(pretrain.info.run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == sorted({*range(every, total + 1, every), total})


def assert_same_results(runs: Path, reference: Path) -> None:
    for stage in ("pretrain", "finetune"):
        ours, theirs = stage_folder(runs, stage), stage_folder(reference, stage)
        assert_same_weights(ours / "model.pt", theirs / "model.pt")
        assert figures(ours) == figures(theirs)


def figures(folder: Path) -> dict[str, float]:
    """A stage's final metrics but its timings: losses, bits per byte, gradient norm, learning rate."""
    return {k: v for k, v in read_json(folder / MANIFEST)["metrics"].items() if "second" not in k}


def test_prefect_server_restarted_mid_run(services, reference, tmp_path):
    """The run goes on through the outage; had Prefect marked it crashed, a rerun resumes. Either way it
    ends as the uninterrupted run, and the `gpu` slot the training held is free again."""
    run_id = start_run(services, tmp_path)
    wait_for(tmp_path, FIRST_CHECKPOINT)
    kill(services, "prefect-server")
    serve.start_prefect_server(services)  # same port, same database
    state = final_state(services, run_id)
    if state == "Crashed":
        state = final_state(services, start_run(services, tmp_path))
    assert state == "Completed"
    assert_same_results(tmp_path, reference)
    with client(services) as c:
        assert c.read_global_concurrency_limit_by_name(serve.GPU_LIMIT).active_slots == 0


def test_worker_killed_mid_run_then_the_rerun_resumes(services, reference, tmp_path):
    log = services.state / "logs" / "worker.log"
    run_id = start_run(services, tmp_path)
    wait_for(tmp_path, FIRST_CHECKPOINT)
    kill(services, "worker")
    assert final_state(services, run_id) == "Crashed"
    assert not (stage_folder(tmp_path, "pretrain") / "model.pt").exists()  # it did stop mid-training
    serve.start_worker(services)
    seen = log.stat().st_size
    assert final_state(services, start_run(services, tmp_path)) == "Completed"
    assert "pretrain: resuming from step_000015" in log.read_text(errors="replace")[seen:]
    assert_same_results(tmp_path, reference)


def test_mlflow_server_restarted_mid_run_loses_no_point(services, reference, tmp_path):
    from mlflow import MlflowClient

    run_id = start_run(services, tmp_path)
    wait_for(tmp_path, FIRST_CHECKPOINT)
    kill(services, "mlflow-server")
    serve.start_mlflow_server(services)  # same port, same store
    assert final_state(services, run_id) == "Completed"
    assert_same_results(tmp_path, reference)

    mlflow = MlflowClient(services.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = mlflow.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{run_id}'")
    (pretrain,) = mlflow.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.stage = 'pretrain'"
    )
    assert parent.info.status == pretrain.info.status == "FINISHED"
    assert_whole_loss_curve(mlflow, pretrain)


def test_two_pipelines_write_one_new_sqlite_store_at_once(services, reference, tmp_path):
    """Two `python -m flows.pipeline` processes start together on a store that does not exist yet
    (tracking straight to SQLite, no MLflow server): both complete, and both runs are whole in the store."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {k: v for k, v in environ_copy().items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": store,
        "PREFECT_API_URL": services.prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [sys.executable, "-m", "flows.pipeline", "--preset", "tiny", "--device", "cpu", "--seed", "3"]
    logs = [tmp_path / f"pipeline{i}.log" for i in range(2)]
    pipelines = [
        subprocess.Popen(
            [*argv, "--runs-dir", str(tmp_path / f"runs{i}"), "--experiment", "two"],
            cwd=tmp_path,
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for i, log in enumerate(logs)
    ]
    try:
        codes = [p.wait(timeout=300) for p in pipelines]
    finally:
        for p in pipelines:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    printed = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], [text[-2000:] for text in printed]
    assert not any("database is locked" in text for text in printed)

    mlflow = MlflowClient(store)
    experiment = mlflow.get_experiment_by_name("two").experiment_id
    runs = mlflow.search_runs([experiment])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    stages = [
        {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
        for p in parents
    ]
    assert stages[0].keys() == stages[1].keys() and "pretrain" in stages[0]
    for children in stages:
        assert_whole_loss_curve(mlflow, children["pretrain"])
    for i in range(2):
        assert_same_results(tmp_path / f"runs{i}", reference)
