"""Classification fine-tuning: pooling under padding, the default source-group task, learning, labels
round-trip, bad input, and the logged pyfunc classifier in a fresh process."""

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmcore.adapters import AdapterConfig
from llmcore.classify import (
    OTHER,
    PAD,
    ClassifyConfig,
    ClassifyDataConfig,
    SequenceClassifier,
    check_default_task,
    load_classifier,
    load_texts,
    passages,
    save_classifier,
    source_group,
    train_classifier,
)
from llmcore.corpus import CorpusConfig, ingest
from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig
from llmcore.train import TrainConfig

TINY = GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32)
# Three source groups with disjoint vocabularies: a separable task whose majority class is "numbers".
WORDS = {
    "animals": "cat dog yak owl emu elk ant bee".split(),
    "numbers": "one two six ten nine four five".split(),
    "colours": "red tan blue pink grey teal gold".split(),
}
DOCS_PER_GROUP = {"animals": 8, "numbers": 14, "colours": 8}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and ("pass --" in message or ": give" in message), message
    return message


def test_pooled_vector_ignores_padding():
    torch.manual_seed(0)
    model = SequenceClassifier(GPT(TINY), num_classes=3).eval()
    short, long = torch.randint(0, 300, (5,)), torch.randint(0, 300, (20,))
    batch = torch.full((2, 20), PAD)
    batch[0, :5], batch[1] = short, long
    lengths = torch.tensor([5, 20])
    with torch.no_grad():
        alone = model.pool(short[None], torch.tensor([5]))[0]
        pooled = model.pool(batch.clamp(min=0), lengths)
        other_pad = batch.clone()
        other_pad[0, 5:] = torch.randint(0, 300, (15,))  # arbitrary tokens in the padding
        repadded = model.pool(other_pad, lengths)
        logits, _ = model(batch)
        moved = batch.clone()
        moved[0, 4] = (short[4] + 1) % 300  # a real token changes: the pooled vector must change
        changed = model.pool(moved.clamp(min=0), lengths)
    torch.testing.assert_close(pooled[0], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(repadded, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], model.label_head(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[0], pooled[0], atol=1e-3)


def test_passages_are_whole_lines_within_the_limit():
    lines = [f"line {i} " + "x" * (i % 7) + "\n" for i in range(60)]
    chunks = passages("".join(lines) + "y" * 130 + "\n", 64)
    assert all(len(c) <= 64 for c in chunks)
    plain = [c for c in chunks if "y" not in c]
    assert all(set(c.splitlines(keepends=True)) <= set(lines) for c in plain)  # whole lines only
    assert "".join(plain) == "".join(lines)[: len("".join(plain))]  # in order, nothing repeated
    assert (
        "".join(chunks).count("y") == 128
    )  # the long line is cut; its 3-character tail is too short to keep


def test_source_group_is_the_top_level_folder_or_file():
    assert source_group("email/mime/text.py") == "email"
    assert source_group("os.py") == "os.py"
    assert source_group("data/rows.jsonl#12") == "data"
    assert source_group("hf:org/name#3") == "hf:org/name"


def write_groups(folder: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for group, n in DOCS_PER_GROUP.items():
        for i in range(n):
            lines = [" ".join(rng.choices(WORDS[group], k=8)) for _ in range(30)]
            (folder / group / f"doc{i}.txt").parent.mkdir(parents=True, exist_ok=True)
            (folder / group / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A three-group corpus, a tokenizer trained on it, and a randomly initialised base model."""
    from llmcore.checkpoint import save_model
    from llmcore.tokenizer import TokenizerConfig, train_tokenizer

    root = tmp_path_factory.mktemp("classify")
    corpus = root / "corpus"
    ingest(CorpusConfig(source=str(write_groups(root / "files")), validation_fraction=0.3), corpus)
    train_tokenizer(corpus, root / "tok", TokenizerConfig(vocab_size=300, num_threads=1))
    torch.manual_seed(0)
    save_model(root / "base.pt", GPT(TINY))
    return root, corpus


def test_default_task_labels_source_groups_split_by_document(setup):
    _, corpus = setup
    data = load_texts(ClassifyDataConfig(max_classes=2, passage_chars=120), corpus)
    assert data.labels == ["numbers", "animals", OTHER]  # the two most frequent groups, then the rest
    train_docs = {json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()}
    assert data.validation and all(not any(text in doc for doc in train_docs) for text, _ in data.validation)
    colours = {w for w in WORDS["colours"]}
    for text, label in data.train + data.validation:
        assert (data.labels[label] == OTHER) == bool(colours & set(text.split()))


def test_one_group_corpus_is_a_one_line_error(tmp_path):
    rows = "".join(json.dumps({"text": f"Chapter {i}. It was a dark night."}) + "\n" for i in range(40))
    (tmp_path / "book.jsonl").write_text(rows)  # one file: forty documents, one group
    ingest(CorpusConfig(source=str(tmp_path / "book.jsonl"), validation_fraction=0.5), tmp_path / "corpus")
    with pytest.raises(ConfigError) as error:
        check_default_task(tmp_path / "corpus")
    assert "one source group (book.jsonl)" in one_line(error) and "--classify-data" in str(error.value)


@pytest.mark.parametrize(
    ("rows", "config", "expected"),
    [
        ([{"body": "a", "label": "x"}], ClassifyDataConfig(classify_data="DATA"), "no column 'text'"),
        ([{"text": "a", "tag": "x"}], ClassifyDataConfig(classify_data="DATA"), "--label-column"),
        (
            [{"text": f"t{i}", "label": "xy"[i % 2]} for i in range(6)] + [{"text": "z", "label": "rare"}],
            ClassifyDataConfig(classify_data="DATA"),
            "label 'rare' has 1 example",
        ),
        (
            [{"text": f"t{i}", "label": "x"} for i in range(6)],
            ClassifyDataConfig(classify_data="DATA"),
            "1 distinct label",
        ),
    ],
)
def test_bad_labelled_data_is_a_one_line_error(tmp_path, rows, config, expected):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError) as error:
        load_texts(ClassifyDataConfig(**{**config.__dict__, "classify_data": str(path)}))
    assert expected in one_line(error)


def test_labelled_csv_is_split_by_text_and_labels_are_sorted(tmp_path):
    import pandas as pd

    rows = [{"review": f"review number {i}", "sentiment": ["pos", "neg", "mixed"][i % 3]} for i in range(60)]
    pd.DataFrame(rows).to_csv(tmp_path / "reviews.csv", index=False)
    config = ClassifyDataConfig(
        classify_data=str(tmp_path / "reviews.csv"),
        classify_text_column="review",
        label_column="sentiment",
        validation_fraction=0.25,
    )
    data = load_texts(config)
    assert data.labels == ["mixed", "neg", "pos"]
    assert len(data.train) + len(data.validation) == 60 and 5 <= len(data.validation) <= 30
    assert {t for t, _ in data.train}.isdisjoint(t for t, _ in data.validation)
    truth = {r["review"]: r["sentiment"] for r in rows}
    assert all(data.labels[y] == truth[t] for t, y in data.train + data.validation)
    assert load_texts(config).validation == data.validation  # the split is a pure function of the texts


def test_labels_and_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SequenceClassifier(GPT(TINY), num_classes=3).eval()
    save_classifier(tmp_path / "model.pt", model, ["b", "a", "c"], max_length=24)
    loaded, labels, max_length = load_classifier(tmp_path / "model.pt")
    assert labels == ["b", "a", "c"] and max_length == 24
    x = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


def train(setup, tmp_path, **adapter):
    root, corpus = setup
    data = load_texts(ClassifyDataConfig(passage_chars=120), corpus)
    recipe = TrainConfig(
        max_steps=40,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=5,
        eval_interval=40,
        eval_batches=2,
        checkpoint_interval=40,
        log_interval=20,
        device="cpu",
    )
    manifest = train_classifier(
        root / "base.pt",
        root / "tok",
        data,
        ClassifyConfig(max_length=32),
        AdapterConfig(**adapter),
        recipe,
        tmp_path / "out",
    )
    return data, manifest


def test_classifier_learns_a_separable_task_and_beats_the_majority_class(setup, tmp_path):
    data, manifest = train(setup, tmp_path)
    metrics = manifest["metrics"]
    assert metrics["classifier_accuracy"] >= 0.9 > metrics["majority_accuracy"]
    assert metrics["classifier_macro_f1"] > metrics["majority_macro_f1"]
    assert metrics["tfidf_accuracy"] >= 0.9  # the same split, the same texts
    assert metrics["finetune/trainable_params"] == metrics["finetune/total_params"]
    assert {row["label"] for row in manifest["per_class"]} == set(data.labels)
    assert (tmp_path / "out" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, labels, _ = load_classifier(tmp_path / "out" / "model.pt")
    assert labels == data.labels == manifest["labels"]
    again = train(setup, tmp_path)[1]  # finished: reused, not retrained
    assert again["metrics"] == metrics


def test_lora_classifier_trains_few_parameters_and_saves_the_adapter_alone(setup, tmp_path):
    _, manifest = train(setup, tmp_path, finetune_method="lora", lora_rank=4)
    metrics = manifest["metrics"]
    assert metrics["finetune/trainable_params"] < metrics["finetune/total_params"] / 3
    assert metrics["classifier_accuracy"] > metrics["majority_accuracy"]
    adapter = tmp_path / "out" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert (adapter / "adapter_model.safetensors").stat().st_size < (
        tmp_path / "out" / "model.pt"
    ).stat().st_size / 2
    load_classifier(tmp_path / "out" / "model.pt")  # the merged model is a plain classifier


@pytest.mark.flow
def test_flow_logs_metrics_and_a_pyfunc_classifier_that_predicts_in_a_fresh_process(
    setup, prefect_harness, tmp_path, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    from flows.classify import classify_flow

    root, corpus = setup
    monkeypatch.chdir(tmp_path)
    recipe = TrainConfig(
        max_steps=20,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=2,
        eval_interval=20,
        eval_batches=1,
        checkpoint_interval=20,
        log_interval=10,
        device="cpu",
    )
    result = classify_flow(
        str(root / "base.pt"),
        str(root / "tok"),
        str(corpus),
        ClassifyDataConfig(passage_chars=120),
        ClassifyConfig(max_length=32),
        AdapterConfig(finetune_method="lora"),
        recipe,
        runs_dir=str(tmp_path / "runs"),
        experiment="classify-test",
    )
    metrics = result["metrics"]
    assert Path(result["classifier_dir"], "model.pt").is_file()
    assert set(metrics) >= {
        "classifier_accuracy",
        "classifier_macro_f1",
        "majority_accuracy",
        "tfidf_accuracy",
        "tfidf_macro_f1",
    }
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("classify-test")
    (run,) = client.search_runs([experiment.experiment_id])
    for key in (*metrics, "finetune/trainable_params", "finetune/total_params", "classify/loss"):
        assert key in run.data.metrics, key
    assert run.data.params["adapter.finetune_method"] == "lora"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "classify")}
    assert {"classify/confusion.png", "classify/per_class.json", "classify/adapter"} <= logged
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    script = (
        "import mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model({model.model_uri!r})\n"
        "out = model.predict(pd.DataFrame({'text': ['cat dog yak owl emu', 'one two six ten nine', '']}))\n"
        "print(out.to_json(orient='records'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    labels = run.data.params["classify_labels"].split(",")
    assert len(rows) == 3 and all(row["label"] in labels for row in rows)
    for row in rows:
        assert set(row) == {"label", *(f"prob_{label}" for label in labels)}
        assert sum(row[f"prob_{label}"] for label in labels) == pytest.approx(1, abs=1e-4)
        assert row["label"] == max(labels, key=lambda label: row[f"prob_{label}"])


def test_pipeline_flags_size_both_kinds_of_fine_tuning():
    from flows.pipeline import PipelineParams, check_inputs

    preset = PipelineParams(
        preset="tiny",
        finetune_steps=5,
        batch_size=3,
        max_length=48,
        finetune_method="lora",
        lora_rank=2,
        lora_targets="c_fc",
        classify_data="tickets.csv",
        classify_text_column="body",
        label_column="intent",
        class_weights=True,
    ).build()
    assert preset.finetune.max_steps == preset.classify_train.max_steps == 5
    assert preset.finetune.batch_size == preset.classify_train.batch_size == 3
    assert preset.adapter == AdapterConfig(finetune_method="lora", lora_rank=2, lora_targets="c_fc")
    assert (preset.classify_data.classify_text_column, preset.classify_data.label_column) == (
        "body",
        "intent",
    )
    assert preset.classify.class_weights and preset.classify.max_length == 48
    probe = PipelineParams(preset="tiny", freeze_trunk=True, max_classes=3, passage_chars=200).build()
    assert probe.classify.freeze_trunk and not preset.classify.freeze_trunk
    assert (probe.classify_data.max_classes, probe.classify_data.passage_chars) == (3, 200)
    with pytest.raises(ConfigError, match="freeze_trunk and LoRA both choose what trains"):
        check_inputs(replace(probe, adapter=preset.adapter), kinds=("classify",))


def test_pipeline_skips_classification_of_a_one_group_corpus_with_a_notice_before_pretraining(
    tmp_path, caplog
):
    from flows.pipeline import PipelineParams, check_derived_inputs

    rows = "".join(
        json.dumps({"text": f"Chapter {i}. It was a dark and stormy night."}) + "\n" for i in range(40)
    )
    (tmp_path / "book.jsonl").write_text(rows)
    ingest(CorpusConfig(source=str(tmp_path / "book.jsonl"), validation_fraction=0.5), tmp_path / "corpus")
    preset = PipelineParams(preset="tiny").build()
    with caplog.at_level("WARNING", logger="llmcore.pipeline"):
        skipped = check_derived_inputs(preset, str(tmp_path / "corpus"), str(tmp_path / "runs"), False)
    assert set(skipped) == {"instruct", "classify"} and "--classify-data" in skipped["classify"]
    notices = [r.getMessage() for r in caplog.records if "classification skipped" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0] and "book.jsonl" in notices[0]
    only = check_derived_inputs(
        preset, str(tmp_path / "corpus"), str(tmp_path / "runs"), False, ("instruct",)
    )
    assert only["classify"].startswith("not chosen")


def test_flat_folder_has_no_default_task_because_held_out_files_are_new_groups(tmp_path):
    rng = random.Random(0)
    for i in range(12):  # twelve files, no folders: each file is its own source group
        (tmp_path / "notes" / f"n{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "notes" / f"n{i}.txt").write_text(" ".join(rng.choices(WORDS["animals"], k=400)))
    ingest(CorpusConfig(source=str(tmp_path / "notes"), validation_fraction=0.3), tmp_path / "corpus")
    with pytest.raises(ConfigError) as error:
        check_default_task(tmp_path / "corpus")
    assert "all fall in one class (other)" in one_line(error) and "--classify-data" in str(error.value)


def test_classification_throughput_counts_the_input_tokens_that_are_not_padding():
    from llmcore.train import token_counts

    x = torch.tensor([[5, 6, 7, PAD], [8, PAD, PAD, PAD]])
    assert token_counts([(x, torch.tensor([0, 1]))], pad_id=PAD) == (2, 4)
    lm = (torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 2, -100], [3, -100, -100]]))
    assert token_counts([lm, lm], pad_id=None) == (6, 6)  # language modelling: the scored targets
