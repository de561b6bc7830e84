"""The whole pipeline on a user's own data, built in the test: a folder of plain-text notes (some without a
suffix, one binary file among them), a parquet file with user instruction pairs, and a `save_to_disk`
dataset read through `hf:`. Non-code corpora give no docstring pairs, so instruction tuning is skipped with
a notice unless --sft-data is given, and evaluation and sampling run on the pretrained model alone. A
single file or dataset is one source group, and a flat folder holds out files whose groups (files) are
not trained on: no default classification task, so classification is skipped with a notice too."""

import json
import logging
import os
import random
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.flow

TEXT = (
    "the river rose after a long rain and every mill along the valley stopped while farmers moved "
    "their sheep to higher ground where old walls kept the wind from small houses of grey stone "
    "children watched boats drift past bridges that their grandparents had built from oak and iron "
    "letters arrived late because roads were closed so news travelled by word of mouth at markets"
)
WORDS = TEXT.split()


def prose(rng: random.Random, sentences: int) -> str:
    """English-like paragraphs: sentences of 6-14 words, a blank line between paragraphs."""
    out = []
    for i in range(sentences):
        words = rng.choices(WORDS, k=rng.randint(6, 14))
        out.append(" ".join(words).capitalize() + "." + ("\n\n" if i % 4 == 3 else " "))
    return "".join(out).strip() + "\n"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_pipeline(workdir: Path, **overrides) -> tuple[list[dict], str]:
    """The tiny pipeline from `workdir`; the summary and the llmcore log lines."""
    from flows.pipeline import PipelineParams, pipeline

    previous, logger, lines = os.getcwd(), logging.getLogger("llmcore"), Lines()
    os.environ.pop(
        "MLFLOW_TRACKING_URI", None
    )  # set by an earlier run in this process: track to workdir/mlruns
    os.chdir(workdir)
    logger.addHandler(lines)
    try:
        params = PipelineParams(
            preset="smoke",
            experiment="own-data",
            vocab_size=512,
            max_steps=20,
            batch_size=8,
            finetune_steps=4,
            device="cpu",
            seed=3,
            **overrides,
        )
        summary = pipeline(**params.model_dump())
    finally:
        logger.removeHandler(lines)
        os.chdir(previous)
    return summary, "\n".join(lines.lines)


def corpus_manifest(workdir: Path) -> dict:
    (manifest,) = (workdir / "runs" / "corpus").glob("*/manifest.json")
    return json.loads(manifest.read_text())


def parent_metrics(workdir: Path) -> dict[str, float]:
    """The pipeline run's evaluation figures (`evaluate/<key>`), by key."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("own-data")
    (parent,) = [
        r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
    ]
    assert parent.info.status == "FINISHED"
    return {
        k.removeprefix("evaluate/"): v for k, v in parent.data.metrics.items() if k.startswith("evaluate/")
    }


def assert_completed(summary: list[dict], finetuned: bool, classified: bool) -> dict:
    by_stage = {row["stage"]: row for row in summary}
    assert list(by_stage) == [
        "corpus",
        "tokenizer",
        "pretrain",
        "finetune",
        "classify",
        "evaluate",
        "sample",
        "promote",
    ]
    classify = by_stage["classify"]
    if classified:
        assert classify["metric"].startswith("accuracy") and classify["seconds"] > 0
    else:
        assert classify["metric"] == "skipped" and "--classify-data" in classify["value"]
    if finetuned:
        assert by_stage["finetune"]["metric"] == "val_loss" and by_stage["finetune"]["value"] > 0
    else:
        assert by_stage["finetune"]["metric"] == "skipped" and "--sft-data" in by_stage["finetune"]["value"]
    assert by_stage["sample"]["value"] > 0
    return by_stage


def test_plain_text_folder_runs_end_to_end_and_skips_instruction_tuning(prefect_harness, tmp_path):
    rng = random.Random(0)
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(40):
        name = f"note-{i:02d}" + (".txt" if i % 3 else "")  # every third note has no suffix
        (notes / name).write_text(prose(rng, rng.randint(6, 16)))
    (notes / "LICENSE").write_text("Permission is granted to copy these notes.\n" + prose(rng, 4))
    (notes / "photo.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(3000)) + b"\0")  # binary
    workdir = tmp_path / "run"
    workdir.mkdir()
    summary, logs = run_pipeline(workdir, corpus=str(notes))
    assert_completed(summary, finetuned=False, classified=False)  # each held-out note is its own group
    manifest = corpus_manifest(workdir)
    counts = manifest["counts"]
    assert counts["files_seen"] == 42 and counts["documents"] == 41
    assert manifest["skipped_by_reason"] == {"not_text": 1} or manifest["skipped_by_reason"] == {"binary": 1}
    assert counts["validation_documents"] >= 1 and manifest["bytes"]["validation"] >= 4096
    assert manifest["split"].startswith("hash")
    assert "instruction tuning skipped" in logs and "validation" in logs
    metrics = parent_metrics(workdir)
    assert metrics["pretrained_bpb"] > 0 and "finetuned_bpb" not in metrics
    assert "held-out documents all fall in one class" in logs and "classifier_accuracy" not in metrics
    assert "pretrained_response_loss" not in metrics


def test_parquet_file_with_user_pairs_fine_tunes(prefect_harness, tmp_path):
    rng = random.Random(1)
    data = tmp_path / "articles.parquet"
    pd.DataFrame({"body": [prose(rng, rng.randint(8, 20)) for _ in range(60)], "n": range(60)}).to_parquet(
        data
    )
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        f.writelines(
            json.dumps({"prompt": f"Describe the valley, part {i}.", "response": prose(rng, 2)}) + "\n"
            for i in range(80)
        )
    summary, logs = run_pipeline(tmp_path, corpus=str(data), text_column="body", sft_data=str(pairs))
    by_stage = assert_completed(summary, finetuned=True, classified=False)
    assert by_stage["corpus"]["value"] == 60
    manifest = corpus_manifest(tmp_path)
    assert manifest["counts"]["validation_documents"] >= 1 and manifest["skipped_by_reason"] == {}
    metrics = parent_metrics(tmp_path)
    assert metrics["pretrained_bpb"] > 0 and metrics["finetuned_bpb"] > 0
    assert metrics["finetuned_response_loss"] < metrics["pretrained_response_loss"]
    assert (
        "one source group" in logs
        and "classification skipped" in logs
        and "classifier_accuracy" not in metrics
    )


def test_saved_dataset_through_hf_runs_end_to_end(prefect_harness, tmp_path):
    import datasets

    rng = random.Random(2)
    saved = tmp_path / "saved"
    part = datasets.Dataset.from_dict({"text": [prose(rng, rng.randint(4, 12)) for _ in range(50)]})
    datasets.DatasetDict({"train": part.select(range(10)), "notes": part}).save_to_disk(str(saved))
    summary, logs = run_pipeline(tmp_path, corpus=f"hf:{saved}", hf_split="notes")
    by_stage = assert_completed(summary, finetuned=False, classified=False)
    assert by_stage["corpus"]["value"] == 50  # the split named on the command line, not train
    manifest = corpus_manifest(tmp_path)
    assert manifest["kind"] == "hf" and manifest["config"]["hf_split"] == "notes"
    assert manifest["counts"]["validation_documents"] >= 1
    assert "instruction tuning skipped" in logs
    assert parent_metrics(tmp_path)["pretrained_bpb"] > 0
