"""The whole pipeline under one Prefect test harness, checked through MLflow afterwards."""

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmcore.environment import environ_copy

pytestmark = pytest.mark.flow

STAGES = ("corpus", "tokenizer", "pretrain", "finetune", "classify", "evaluate", "sample")
# The held-out classification report: on the evaluate run and, as `evaluate/<key>`, on the parent.
CLASSIFICATION = (
    "classifier_accuracy",
    "classifier_macro_f1",
    "majority_accuracy",
    "tfidf_accuracy",
    "tfidf_macro_f1",
)


@pytest.fixture(scope="module")
def pipeline_run(prefect_harness, tmp_path_factory):
    """Run the pipeline once, tiny, from a temporary working folder (runs/ and mlruns/ land there)."""
    import os

    from flows.pipeline import PipelineParams, pipeline

    workdir = tmp_path_factory.mktemp("pipeline")
    started = datetime.now(UTC)  # task runs of other tests in this session's harness came before
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        params = PipelineParams(
            preset="smoke",
            experiment="flow-test",
            max_corpus_bytes=1_500_000,
            vocab_size=1024,
            max_steps=30,
            finetune_steps=6,
            batch_size=8,
            device="cpu",
            seed=7,
        )
        summary = pipeline(**params.model_dump())
        rerun = pipeline(**params.model_dump())  # unchanged inputs: cached stages, finished training reused
    finally:
        os.chdir(previous)
    return workdir, summary, rerun, started


def test_pipeline_logs_a_parent_run_with_one_child_per_stage(pipeline_run):
    import mlflow
    from mlflow import MlflowClient

    workdir, summary, _, _ = pipeline_run
    assert [row["stage"] for row in summary] == [*STAGES, "promote"]
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("flow-test")
    assert experiment.artifact_location.endswith("mlruns/artifacts")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2  # one per pipeline flow run
    parent = parents[0]
    assert parent.data.tags["prefect.flow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.params["preset"] == "smoke" and parent.data.params["model.vocab_size"] == "1024"
    children = {
        r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(STAGES)

    corpus = children["corpus"].data
    assert corpus.metrics["corpus/documents"] > 50 and corpus.params["corpus.max_bytes"] == "1500000"
    tokenizer = children["tokenizer"].data
    assert (
        tokenizer.metrics["tokenizer/vocab_size"] == 1024
        and tokenizer.metrics["tokenizer/bytes_per_token"] > 1.5
    )
    pretrain = children["pretrain"]
    assert pretrain.data.params["pretrain.max_steps"] == "30"
    history = client.get_metric_history(pretrain.info.run_id, "pretrain/loss")
    assert len(history) == 3 and history[-1].value < history[0].value  # step metrics, and learning
    assert "pretrain/tokens_per_second" in pretrain.data.metrics
    evaluation = {k.removeprefix("evaluate/"): v for k, v in children["evaluate"].data.metrics.items()}
    for key in (
        "pretrained_bpb",
        "finetuned_bpb",
        "gzip_bpb",
        "bz2_bpb",
        "xz_bpb",
        "finetuned_response_loss",
        "pretrained_response_loss",
        "pretrained_perplexity",
    ):
        assert key in evaluation, key
    assert 0 < evaluation["xz_bpb"] < evaluation["gzip_bpb"]
    assert evaluation["finetuned_response_loss"] < evaluation["pretrained_response_loss"]
    assert evaluation["cloze_chance"] == 0.25 and evaluation["cloze_items"] == 200
    on_parent = parent.data.metrics
    for key in CLASSIFICATION:
        assert 0 <= evaluation[key] <= 1 and on_parent[f"evaluate/{key}"] == evaluation[key], key
    assert evaluation["classify_imbalance_ratio"] >= 1
    # both kinds of fine-tuning ran (full weights): each run counts what it trained
    for stage in ("finetune", "classify"):
        trained = children[stage].data.metrics
        assert 0 < trained["finetune/trainable_params"] == trained["finetune/total_params"], stage
    classify = children["classify"].data
    assert classify.params["classify_train.max_steps"] == "6" and "classify/loss" in classify.metrics
    report = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "classify")}
    assert {"classify/confusion.png", "classify/per_class.json"} <= report
    for model in ("pretrained", "finetuned"):
        assert 0 <= evaluation[f"{model}_cloze_accuracy"] <= 1
        # the same bytes, with more context per token: after 30 steps the model barely uses context
        assert (
            abs(evaluation[f"{model}_bpb_strided"] - evaluation[f"{model}_bpb"])
            < 0.05 * evaluation[f"{model}_bpb"]
        )
        assert 0 <= children["sample"].data.metrics[f"sample/{model}_python_parse_rate"] <= 1
        for strategy in ("greedy", "temperature", "top_k", "top_p"):
            assert 0 < children["sample"].data.metrics[f"sample/{model}_{strategy}_distinct_2"] <= 1
            assert 0 <= children["sample"].data.metrics[f"sample/{model}_{strategy}_repetition_rate"] < 1
    assert children["evaluate"].data.params["evaluation.bpb_stride"] == "64"
    for name in ("held_out_text", "cloze", "sft_validation"):
        assert 0 <= evaluation[f"contaminated_fraction/{name}"] <= 1, name
    contamination = client.download_artifacts(
        children["evaluate"].info.run_id, "contamination.json", str(workdir)
    )
    report = json.loads(Path(contamination).read_text())
    assert report["n"] == 13 and report["sets"]["cloze"]["items"] == 200
    for name, figures in report["sets"].items():
        assert figures["contaminated"] == len(report["items"][name])
        assert figures["contaminated_fraction"] == evaluation[f"contaminated_fraction/{name}"]
    headline = parent.data.metrics  # the evaluate figures are on the parent run too
    for key in ("pretrained_cloze_accuracy", "finetuned_cloze_accuracy", "cloze_chance"):
        assert headline[f"evaluate/{key}"] == evaluation[key], key

    # the rerun's stages were skipped or reused, yet every child run still carries its record
    rerun = {
        r.data.tags["stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id
    }
    assert set(rerun) == set(STAGES)
    for stage, run in rerun.items():
        assert run.data.params and run.data.metrics and run.info.status == "FINISHED", stage
    assert (
        rerun["tokenizer"].data.metrics["tokenizer/bytes_per_token"]
        == tokenizer.metrics["tokenizer/bytes_per_token"]
    )

    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id, "pretrain")}
    assert artifacts == {"pretrain/manifest.json"}  # the weights live in the logged model only
    tokenizer_files = {a.path for a in client.list_artifacts(children["tokenizer"].info.run_id, "tokenizer")}
    assert "tokenizer/tokenizer.model" in tokenizer_files
    samples = client.download_artifacts(children["sample"].info.run_id, "samples.json", str(workdir))
    table = json.loads(Path(samples).read_text())
    assert len(table["data"]) == 2 * 4 * 4  # two models, four strategies, four prompts
    assert set(table["columns"]) == {
        "model",
        "strategy",
        "prompt",
        "completion",
        "distinct_2",
        "repetition_rate",
        "parses_as_python",
    }


def test_rerun_reuses_cached_stages(pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.runners import local_cores
    from llmcore import corpus
    from llmcore.corpus import CorpusConfig
    from llmcore.tokenizer import plan_encoding

    workdir, first, rerun, started = pipeline_run
    seconds = {row["stage"]: row["seconds"] for row in first}
    again = {row["stage"]: row["seconds"] for row in rerun}
    assert again["pretrain"] < seconds["pretrain"]
    with get_client(sync_client=True) as client:

        def states(name: str) -> list[str]:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))
            return sorted(r.state.name for r in runs if r.created >= started)

        assert states("train-tokenizer") == ["Cached", "Completed"]
        # One ingest-part task per part of the source and phase, and one encode-part task per part of the
        # corpus, all in the first run: the rerun reuses the finished corpus and shards.
        files = corpus._resolve(CorpusConfig())[1]  # the standard library's files
        assert states("ingest-part") == ["Completed"] * 2 * len(
            corpus.plan_ingestion(files, None, local_cores())
        )
        (corpus_dir,) = (
            d for d in (workdir / "runs" / "corpus").iterdir() if (d / "manifest.json").is_file()
        )
        assert states("encode-part") == ["Completed"] * len(plan_encoding(corpus_dir, local_cores()))
    assert [r["value"] for r in rerun if r["stage"] == "pretrain"] == [
        r["value"] for r in first if r["stage"] == "pretrain"
    ]


def test_logged_pyfunc_model_generates_in_a_fresh_process(pipeline_run, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    workdir, _, _, _ = pipeline_run
    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = MlflowClient().get_experiment_by_name("flow-test")
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    names = {m.name for m in models}
    assert {"pretrained", "finetuned"} <= names
    model_uri = next(m.model_uri for m in models if m.name == "finetuned")
    script = (
        "import mlflow, pandas as pd, sys\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
        "out = model.predict(pd.DataFrame({'prompt': ['Return the sum of a and b.', 'Open a file.']}),"
        " params={'max_new_tokens': 12, 'temperature': 0.0})\n"
        "assert len(out) == 2 and all(isinstance(t, str) and t for t in out), out\n"
        "print('OK', out)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK")


def test_a_rerun_links_to_the_runs_it_reuses_and_stores_no_new_model(pipeline_run):
    import mlflow
    from mlflow import MlflowClient

    workdir, _, _, _ = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("flow-test").experiment_id
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    first, second = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert first.info.run_name == second.info.run_name and first.info.run_name.startswith(
        "pipeline-smoke-stdlib-"
    )

    def stage_runs(parent):
        return {
            r.data.tags["stage"]: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }

    made, reused = stage_runs(first), stage_runs(second)
    for stage, folder in (
        ("corpus", "corpus"),
        ("tokenizer", "tokenizer"),
        ("tokenizer", "tokens"),
        ("pretrain", "pretrain"),
        ("finetune", "finetune"),
        ("finetune", "sft_data"),
        ("classify", "classify"),
    ):
        assert reused[stage].data.tags[f"reused.{folder}"] == made[stage].info.run_id, folder
    curve = client.get_metric_history(reused["pretrain"].info.run_id, "pretrain/loss")
    assert [m.value for m in curve] == [
        m.value for m in client.get_metric_history(made["pretrain"].info.run_id, "pretrain/loss")
    ]
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    # the rerun stored no new copy
    assert sorted(m.name for m in models) == ["classifier", "finetuned", "pretrained"]
    assert reused["pretrain"].data.tags["reused.model.pretrained"] in {m.model_id for m in models}
    inputs = {(i.dataset.name, i.tags[0].value) for i in made["tokenizer"].inputs.dataset_inputs}
    assert inputs == {("corpus", "training"), ("tokens", "output")}


def test_registered_versions_carry_their_hugging_face_export(pipeline_run):
    import mlflow
    from mlflow import MlflowClient

    workdir, _, _, _ = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    for name in ("flow-test-pretrained", "flow-test-instruct"):
        version = client.get_model_version_by_alias(name, "champion")
        assert int(version.version) == 1  # the first run's models; the rerun registered nothing new
        uri = version.tags["hf_export"]
        assert uri == f"runs:/{version.run_id}/hf_export"
        files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(version.run_id, "hf_export")}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    classifier = client.get_model_version_by_alias("flow-test-classifier", "champion")
    assert int(classifier.version) == 1 and "hf_export" not in classifier.tags
    assert classifier.tags["promotion.metric"] == "macro_f1" and float(classifier.tags["eval.macro_f1"]) >= 0


def test_evaluate_model_rescores_logged_models_on_a_run_linked_to_the_source(pipeline_run):
    import os

    import mlflow
    from mlflow import MlflowClient

    from flows.evaluate_model import evaluate_model
    from llmcore.corpus import CorpusConfig
    from llmcore.errors import ConfigError
    from llmcore.evaluate import EvalConfig, held_out_text, score_text
    from tasks.logged_models import resolve
    from tasks.registry import HELD_OUT_BYTES_PER_TOKEN

    workdir, _, _, _ = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    champion = client.get_model_version_by_alias("flow-test-pretrained", "champion")
    model_id = champion.source.removeprefix("models:/")  # the logged model it was registered from
    experiment = client.get_experiment_by_name("flow-test").experiment_id
    stage_runs = client.search_runs(
        [experiment], "tags.stage = 'pretrain'", order_by=["attributes.start_time"]
    )
    made, reused = (r.info.run_id for r in stage_runs)
    # every way of naming the model reaches the same logged model; the rerun's stage run reused it
    for named in (
        resolve("models:/flow-test-pretrained/1"),
        resolve(f"models:/{model_id}"),
        resolve(f"runs:/{made}/pretrained"),
        resolve(run_id=made),
        resolve(run_id=reused),
    ):
        assert (named.model_id, named.source_run_id) == (model_id, champion.run_id)
    parent = client.get_run(made).data.tags["mlflow.parentRunId"]
    with pytest.raises(ConfigError, match=f"run {parent} logged no models: pass --model-uri one of runs:/"):
        resolve(run_id=parent)

    previous = os.getcwd()
    os.chdir(workdir)  # the pipeline's runs/ folder: its corpus ingestion is reused
    try:
        config = EvalConfig(max_tokens=2048, device="cpu")
        metrics = evaluate_model(
            model_uri="models:/flow-test-pretrained@champion",
            corpus=CorpusConfig(source="stdlib", max_bytes=1_500_000),
            evaluation=config,
            experiment="flow-test",
        )
        # like with like: the same figure as scoring the pipeline's own model file on the same text
        model_file = next((workdir / "runs" / "pretrain").glob("*/model.pt"))
        tokenizer_dir = next((workdir / "runs" / "tokenizer").glob("*/tokenizer.model")).parent
        corpus_dir = next((workdir / "runs" / "corpus").iterdir())
        texts = held_out_text(corpus_dir, config.max_tokens * HELD_OUT_BYTES_PER_TOKEN)
        direct = score_text(model_file, tokenizer_dir, texts, config, strided=True)
    finally:
        os.chdir(previous)
    for key in ("bpb", "bpb_strided", "bpb_stride"):
        assert metrics[f"rescore/{key}"] == pytest.approx(direct[key], rel=1e-6), key
    assert direct["bpb_stride"] == 64  # half the context: the strided windows overlap
    # today's cloze task too: four choices per held-out line, scored like the evaluate stage scores them
    assert metrics["rescore/cloze_chance"] == pytest.approx(0.25) and metrics["rescore/cloze_items"] > 0
    assert 0 <= metrics["rescore/cloze_accuracy"] <= 1
    assert all(
        0 < metrics[f"rescore/{c}_bpb"] < 8 for c in ("gzip", "bz2", "xz")
    )  # the same bytes, compressed

    (run,) = client.search_runs([experiment], "tags.stage = 'rescore'")
    assert run.data.tags["source.model_id"] == model_id
    assert run.data.tags["source.run_id"] == made
    assert run.data.tags["source.registered"] == f"flow-test-pretrained/{champion.version}"
    assert run.data.metrics["rescore/bpb"] == metrics["rescore/bpb"]
    linked = {m.key: m.value for m in mlflow.get_logged_model(model_id).metrics}
    assert linked["rescore/bpb"] == metrics["rescore/bpb"]  # on the model's own page too


def test_compare_tables_the_experiment_and_plots_bits_per_byte_against_tokens(pipeline_run, tmp_path):
    import json
    import os

    import mlflow
    from mlflow import MlflowClient

    from flows.compare import bpb_curves, compare, find_runs

    workdir, _, _, _ = pipeline_run
    previous = os.getcwd()
    os.chdir(workdir)  # where the pipeline ran: its ./mlruns store
    try:
        result = compare(experiment="flow-test", filter="params.preset = 'smoke'")
    finally:
        os.chdir(previous)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    table = result["table"]
    assert list(table["stage"]) == ["pipeline", "pipeline"]  # top-level pipeline runs only, newest first
    assert set(table["model.vocab_size"]) == {"1024"} and table["evaluate/pretrained_bpb"].notna().all()
    # each pipeline's curve comes from its pretraining stage run; its last point: 30 steps of 8 x 128 tokens
    curves = bpb_curves(table["run_id"].tolist())
    manifest = json.loads(next((workdir / "runs" / "pretrain").glob("*/manifest.json")).read_text())
    assert sorted(curves) == sorted(result["curves"]) and len(curves) == 2
    for curve in curves.values():
        assert curve["tokens"].iloc[-1] == 30 * 8 * 128
        assert curve["val_bpb"].iloc[-1] == pytest.approx(manifest["metrics"]["val_bpb"])
    client = MlflowClient()
    files = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"compare.json", "val_bpb_vs_tokens.png"} <= files
    logged = json.loads(
        Path(client.download_artifacts(result["run_id"], "compare.json", str(tmp_path))).read_text()
    )
    assert len(logged["data"]) == 2 and "evaluate/xz_bpb" in logged["columns"]
    stages = set(find_runs("flow-test", children=True)["stage"])
    assert "pretrain" in stages and "compare" not in stages  # a comparison never lists comparisons


@pytest.mark.cli
def test_a_model_uri_that_does_not_exist_is_one_line_naming_what_does(pipeline_run):

    workdir, _, _, _ = pipeline_run
    environment = {
        **environ_copy(),
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "flows.evaluate_model", "--model-uri", "models:/flow-test-pretrained/9"],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: registered model 'flow-test-pretrained' has no version 9 (models:/flow-test-pretrained/9): "
        "pass one of versions 1 or an alias"
    ]
