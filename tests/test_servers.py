"""The deployments on real servers: `deployments/serve.py up` (what `make serve` runs) on free loopback
ports, a tiny nightly run triggered with overridden parameters, checked through the MLflow client; then a
worse run that must leave the champion where it was. Every process started is stopped, also on failure."""

import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.artifacts import MANIFEST, read_json
from llmcore.environment import environ_copy
from tests.tiny_run import assert_same_weights

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.servers
spec = importlib.util.spec_from_file_location("serve", ROOT / "deployments" / "serve.py")
serve_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_py)

EXPERIMENT = "llm-pipeline-nightly"  # from prefect.yaml: must survive the per-run overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    state = tmp_path_factory.mktemp("serve")
    prefect_port, mlflow_port = free_port(), free_port()
    env = environ_copy(PYTHONPATH=str(ROOT))
    log = open(state / "serve.log", "w")
    serve = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deployments" / "serve.py"),
            "up",
            "--state",
            str(state),
            "--mlruns",
            str(state / "mlruns"),
            "--prefect-port",
            str(prefect_port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 420
        while "ready" not in (state / "serve.log").read_text():
            assert serve.poll() is None, (state / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve.py up did not get ready"
            time.sleep(1)
        yield {
            "state": state,
            "up": serve,
            "serve": serve_py.Services(state, state / "mlruns", prefect_port, mlflow_port),
            "api": f"http://127.0.0.1:{prefect_port}/api",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "env": {
                **env,
                "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            },
        }
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)  # what Ctrl-C does: serve.py stops everything it started
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        subprocess.run(
            [sys.executable, str(ROOT / "deployments" / "serve.py"), "down", "--state", str(state)], env=env
        )
        assert not list((state / "pids").glob("*.pid"))


def prefect(services, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), *args],
        env=services["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_run(services, deployment_name: str = "pipeline/nightly-cpu", **params) -> str:
    """Create a run of a deployment with `params` overriding its defaults; return its id."""
    with client(services) as c:
        deployment = c.read_deployment_by_name(deployment_name)
        return str(c.create_flow_run_from_deployment(deployment.id, parameters=params).id)


def final_state(services, run_id: str, limit: float = 900) -> str:
    """The flow run's final state name, polling through server outages; fails after `limit` seconds."""
    deadline, slots = time.monotonic() + limit, "unknown"
    while time.monotonic() < deadline:
        try:
            with client(services) as c:
                state = c.read_flow_run(run_id).state
                slots = c.read_global_concurrency_limit_by_name(serve_py.GPU_LIMIT).active_slots
            if state.is_final():
                return state.name
        except Exception:  # noqa: BLE001 - the server is down or starting: ask again
            pass
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not final after {limit:.0f} s (gpu slots in use: {slots})")


def trigger_and_wait(services, deployment_name: str = "pipeline/nightly-cpu", **params) -> tuple[str, float]:
    """Run a deployment with `params` overriding its defaults; return (final state name, seconds)."""
    started = time.monotonic()
    state = final_state(services, start_run(services, deployment_name, **params))
    return state, time.monotonic() - started


def client(services):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: services["api"]}):
        return get_client(sync_client=True)


TINY = dict(preset="tiny", device="cpu", seed=3)


@pytest.fixture(scope="module")
def nightly_runs(tmp_path_factory) -> Path:
    """The runs folder of `two_runs`: its tiny run is the uninterrupted reference of the fault tests."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def two_runs(services, nightly_runs):
    runs = str(nightly_runs)
    first = trigger_and_wait(services, **TINY, runs_dir=runs)
    worse = trigger_and_wait(services, **TINY, runs_dir=runs, max_steps=2, finetune_steps=1)
    print(f"\ntrigger-to-completion: {first[1]:.1f} s (tiny), {worse[1]:.1f} s (2 steps)")
    return first, worse


def test_two_runs_register_and_gate_the_champion(services, two_runs):
    import mlflow
    from mlflow import MlflowClient

    (first, _), (worse, _) = two_runs
    assert first == worse == "Completed"
    mlflow.set_tracking_uri(services["mlflow"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)  # the deployment's default was kept
    parents = [
        r
        for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    assert parents[0].data.params["preset"] == "tiny" and parents[1].data.params["pretrain.max_steps"] == "2"
    assert parents[0].data.tags["prefect.flow_run_id"]

    name = f"{EXPERIMENT}-pretrained"
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    assert [v.run_id for v in versions] != [None, None]
    assert {v.run_id for v in versions} <= {
        r.info.run_id for r in client.search_runs([experiment.experiment_id])
    }
    first_tags, worse_tags = versions[0].tags, versions[1].tags
    assert first_tags["promotion.promoted"] == "true" and "promotion.champion_score" not in first_tags
    assert worse_tags["promotion.promoted"] == "false"
    assert float(worse_tags["promotion.challenger_score"]) > float(worse_tags["promotion.champion_score"])
    assert float(worse_tags["promotion.champion_score"]) == pytest.approx(
        float(first_tags["promotion.challenger_score"])
    )
    assert "eval.bpb" in first_tags
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    instruct = client.get_model_version_by_alias(f"{EXPERIMENT}-instruct", "champion")
    print("decisions:", first_tags["promotion.decision"], "|", worse_tags["promotion.decision"])

    # the champion generates in a fresh process, through the server, from a list of strings
    script = (
        "import mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{EXPERIMENT}-instruct@champion')\n"
        "out = model.predict(['Return the sum of a and b.', 'Open a file.'], params={'max_new_tokens': 8})\n"
        "assert len(out) == 2 and all(isinstance(t, str) for t in out), out\nprint('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=services["env"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    assert instruct.version == "1"


def test_weekly_champion_evaluation_and_ad_hoc_sampling_deployments(services, two_runs, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    evaluated, _ = trigger_and_wait(
        services,
        "champion-evaluation/weekly-champion",
        runs_dir=str(tmp_path),
        corpus={"source": "stdlib", "max_bytes": 1_000_000},
        evaluation={"max_tokens": 2048},
    )
    sampled, _ = trigger_and_wait(
        services, "sample-registered-model/sample", prompts=["Open a file."], sampling={"max_new_tokens": 8}
    )
    assert evaluated == sampled == "Completed"
    mlflow.set_tracking_uri(services["mlflow"])
    champion = MlflowClient().get_model_version_by_alias(f"{EXPERIMENT}-pretrained", "champion")
    weekly = [k for k in champion.tags if k.startswith("weekly.") and k.endswith(".bpb")]
    assert weekly and 0 < float(champion.tags[weekly[0]]) < 10


def test_prefect_shows_artifacts_and_forwarded_training_logs(services, two_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: services["api"]}), get_client(sync_client=True) as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["pipeline-report", "promotion", "pretrain-progress"])
                )
            )
        }
        assert keys == {"pipeline-report", "promotion", "pretrain-progress"}
        progress = [a for a in client.read_artifacts() if a.type == "progress"]
        assert progress and max(float(a.data) for a in progress) == 100.0
        logs = client.read_logs(
            log_filter=LogFilter(name=LogFilterName(any_=["llmcore.train", "llmcore.pipeline"]))
        )
        assert logs, "the llmcore loggers did not reach the Prefect API"
        assert (
            client.read_global_concurrency_limit_by_name("gpu").limit == 1
        )  # two trainings never share a GPU


@pytest.mark.parametrize(
    "params, message",
    [
        ({"preset": "huge"}, "Validation failed for field 'preset'"),
        ({"max_step": 5}, "specified but not found on the deployment: 'max_step'"),
        ({"max_steps": "many"}, "Validation failed for field 'max_steps'"),
    ],
)
def test_bad_deployment_parameters_are_refused_when_the_run_is_created(services, params, message):
    args = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    done = prefect(services, "deployment", "run", "pipeline/nightly-cpu", *args)
    assert done.returncode != 0
    assert message in " ".join((done.stdout + done.stderr).split()), done.stdout[-2000:]


def test_unknown_registered_model_or_alias_is_one_line(services, two_runs):
    for argv, message in (
        (["--model-name", "nope"], "no registered model 'nope'"),
        (["--model-name", f"{EXPERIMENT}-instruct", "--alias", "gold"], "has no alias 'gold'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "flows.champion", "sample", *argv],
            env=services["env"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-2000:]


# --- faults of the services, on the same stack; then `serve.py down` (these run last, in this order) -----
# Each interrupted tiny run must end with the weights and metrics of the uninterrupted tiny run of
# `two_runs` (the same parameters, so the same stage folders by key).

FIRST_CHECKPOINT = "pretrain/*/checkpoints/step_000015.json"  # the tiny preset's 30 steps: one at 15


def wait_for(runs: Path, pattern: str, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not glob.glob(str(runs / pattern)):
        assert time.monotonic() < deadline, f"no {pattern} under {runs} after {limit:.0f} s"
        time.sleep(0.05)


def kill(services, name: str) -> None:
    """SIGKILL the process group `serve.py` recorded for `name`, as a crash would."""
    os.killpg(int(services["serve"].pid_file(name).read_text()), signal.SIGKILL)


def assert_same_results(runs: Path, reference: Path) -> None:
    """Every stage folder of `runs` holds the weights and final metrics (timings aside) of the reference's."""
    for stage in ("pretrain", "finetune"):
        (ours,) = (runs / stage).iterdir()
        theirs = reference / stage / ours.name
        assert_same_weights(ours / "model.pt", theirs / "model.pt")
        assert figures(ours) == figures(theirs)


def figures(folder: Path) -> dict[str, float]:
    return {k: v for k, v in read_json(folder / MANIFEST)["metrics"].items() if "second" not in k}


def assert_whole_loss_curve(mlflow, pretrain) -> None:
    """Every logged point of the pretraining loss is in the store, once."""
    total, every = (int(pretrain.data.params[f"pretrain.{k}"]) for k in ("total_steps", "log_interval"))
    history = mlflow.get_metric_history(pretrain.info.run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == sorted({*range(every, total + 1, every), total})


@pytest.mark.faults
def test_prefect_server_restarted_mid_run(services, two_runs, nightly_runs, tmp_path):
    """The run goes on through the outage; had Prefect marked it crashed, a rerun resumes. Either way it
    ends as the uninterrupted run, and the `gpu` slot the training held is free again (with leases in the
    server's memory, the slot stayed taken and the next training waited for ever)."""
    run_id = start_run(services, **TINY, runs_dir=str(tmp_path))
    wait_for(tmp_path, FIRST_CHECKPOINT)
    kill(services, "prefect-server")
    serve_py.start_prefect_server(services["serve"])  # same port, same database
    state = final_state(services, run_id)
    if state == "Crashed":
        state = final_state(services, start_run(services, **TINY, runs_dir=str(tmp_path)))
    assert state == "Completed"
    assert_same_results(tmp_path, nightly_runs)
    with client(services) as c:
        assert c.read_global_concurrency_limit_by_name(serve_py.GPU_LIMIT).active_slots == 0


@pytest.mark.faults
def test_worker_killed_mid_run_then_the_rerun_resumes(services, two_runs, nightly_runs, tmp_path):
    log = services["state"] / "logs" / "worker.log"
    run_id = start_run(services, **TINY, runs_dir=str(tmp_path))
    wait_for(tmp_path, FIRST_CHECKPOINT)
    kill(services, "worker")
    assert final_state(services, run_id) == "Crashed"
    assert not list(tmp_path.glob("pretrain/*/model.pt"))  # it did stop mid-training
    serve_py.start_worker(services["serve"])
    seen = log.stat().st_size
    assert final_state(services, start_run(services, **TINY, runs_dir=str(tmp_path))) == "Completed"
    assert "pretrain: resuming from step_000015" in log.read_text(errors="replace")[seen:]
    assert_same_results(tmp_path, nightly_runs)


@pytest.mark.faults
def test_mlflow_server_restarted_mid_run_loses_no_point(services, two_runs, nightly_runs, tmp_path):
    from mlflow import MlflowClient

    run_id = start_run(services, **TINY, runs_dir=str(tmp_path))
    wait_for(tmp_path, FIRST_CHECKPOINT)
    kill(services, "mlflow-server")
    serve_py.start_mlflow_server(services["serve"])  # same port, same store
    assert final_state(services, run_id) == "Completed"
    assert_same_results(tmp_path, nightly_runs)

    mlflow = MlflowClient(services["mlflow"])
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = mlflow.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{run_id}'")
    (pretrain,) = mlflow.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.stage = 'pretrain'"
    )
    assert parent.info.status == pretrain.info.status == "FINISHED"
    assert_whole_loss_curve(mlflow, pretrain)


@pytest.mark.faults
def test_two_pipelines_write_one_new_sqlite_store_at_once(services, two_runs, nightly_runs, tmp_path):
    """Two `python -m flows.pipeline` processes start together on a store that does not exist yet
    (tracking straight to SQLite, no MLflow server): both complete, and both runs are whole in the store
    (one failed with `table secrets already exists` when both created the store's tables)."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {k: v for k, v in environ_copy().items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": store,
        "PREFECT_API_URL": services["api"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [sys.executable, "-m", "flows.pipeline", "--preset", "tiny", "--device", "cpu", "--seed", "3"]
    logs = [tmp_path / f"pipeline{i}.log" for i in range(2)]
    pipelines = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            pipelines.append(
                subprocess.Popen(
                    [*argv, "--runs-dir", str(tmp_path / f"runs{i}"), "--experiment", "two"],
                    cwd=tmp_path,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        codes = [p.wait(timeout=600) for p in pipelines]
    finally:
        for p in pipelines:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    printed = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], [text[-2000:] for text in printed]
    assert not any("database is locked" in text for text in printed)

    mlflow = MlflowClient(store)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("two").experiment_id])
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
        assert_same_results(tmp_path / f"runs{i}", nightly_runs)


def test_down_stops_a_serve_up_waiting_in_the_foreground(services):
    """`make serve` then `make down` from another shell: the waiting `up` exits 0 having stopped every
    service once (the ones the fault tests restarted included), and no service process is left. Last in
    this file: it stops the module's services."""
    state, up = services["state"], services["up"]
    groups = [int(p.read_text()) for p in (state / "pids").glob("*.pid")]
    down = subprocess.run(
        [sys.executable, str(ROOT / "deployments" / "serve.py"), "down", "--state", str(state)],
        env=services["env"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert down.returncode == 0 and down.stdout.startswith("stopped: serve.py up, "), down
    assert up.wait(timeout=30) == 0
    printed = (state / "serve.log").read_text()
    assert printed.count("stopped: ") == 1 and "Traceback" not in printed, printed[-3000:]
    assert len(groups) == 3 and not any(map(serve_py._alive, groups))  # zombies of this process aside
    assert not list(state.glob("**/*.pid"))
