"""Every preset loads; the pipeline's parameters override it; bad input fails at once, in one line."""

import subprocess
import sys
from dataclasses import replace

import pytest

from flows.pipeline import PipelineParams, check_inputs
from llmcore.errors import ConfigError
from llmcore.model import GPT
from llmcore.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_builds_its_model(name):
    preset = get_preset(name)
    assert preset.name == name and preset.model.vocab_size == preset.tokenizer.vocab_size
    with __import__("torch").device("meta"):
        params = GPT(preset.model).num_params()
    expected = {"tiny": (1e4, 5e5), "smoke": (1e5, 2e6), "cpu": (1e6, 2e7), "gpu": (1.0e8, 1.6e8)}[name]
    assert expected[0] < params < expected[1]


def test_gpu_preset_is_gpt2_small_sized():
    with __import__("torch").device("meta"):
        assert 115e6 < GPT(get_preset("gpu").model).num_params() < 135e6


def test_overrides_reach_the_right_configs():
    preset = PipelineParams(
        vocab_size=3000,
        n_layer=3,
        max_steps=9,
        batch_size=5,
        learning_rate=0.01,
        finetune_steps=4,
        group_by_length=True,
        device="cpu",
        seed=3,
        corpus="docs",
        max_corpus_bytes=1000,
    ).build()
    assert preset.tokenizer.vocab_size == preset.model.vocab_size == 3000
    assert preset.model.n_layer == 3 and preset.pretrain.max_steps == 9 and preset.finetune.max_steps == 4
    assert preset.pretrain.batch_size == preset.finetune.batch_size == 5
    assert preset.finetune.group_by_length and not preset.classify_train.group_by_length  # instruction only
    assert preset.pretrain.seed == preset.sampling.seed == 3 and preset.evaluation.device == "cpu"
    assert preset.corpus.source == "docs" and preset.corpus.max_bytes == 1000
    assert replace(preset, name="x").pretrain.learning_rate == 0.01


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(preset="huge"), "unknown preset"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(max_steps=0), "max_steps"),
        (dict(batch_size=-2), "batch_size"),
        (dict(vocab_size=100), "does not fit the byte fallback"),
        (dict(max_length=4096), "does not fit the model"),
        (dict(n_head=3), "n_head"),
        (dict(corpus="s3://bucket/data"), "unsupported corpus source"),
        (dict(max_length=0), "does not fit the model"),
        (dict(device="cudax"), "unknown device"),
    ],
)
def test_bad_parameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        PipelineParams(**params).build()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--corpus", "/no/such/folder"], "does not exist"),
        (["--preset", "huge"], "unknown preset"),
        (["--learning-rate", "nan"], "learning_rate"),
        (["--vocab-size", "64"], "does not fit the byte fallback"),
        (["--sft-data", "/no/such/pairs.jsonl"], "fine-tuning data /no/such/pairs.jsonl does not exist"),
        (["--cloze-data", "/no/such/items.jsonl"], "cloze data /no/such/items.jsonl does not exist"),
    ],
)
def test_cli_fails_before_any_work_with_one_line(argv, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


def test_help_lists_the_knobs_users_turn():
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--help"], capture_output=True, text=True, timeout=120
    )
    for flag in (
        "--preset",
        "--corpus",
        "--experiment",
        "--vocab-size",
        "--n-layer",
        "--max-steps",
        "--max-tokens",
        "--batch-size",
        "--learning-rate",
        "--device",
        "--seed",
        "--runs-dir",
    ):
        assert flag in done.stdout, flag


def test_a_named_cuda_device_without_cuda_fails_before_work(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        check_inputs(PipelineParams(device="cuda").build())
    assert check_inputs(PipelineParams(device="auto").build()) is None


def test_a_stage_error_inside_the_flow_ends_with_one_clear_line(tmp_path):
    """A vocabulary the corpus cannot fill is found by the tokenizer stage, inside Prefect."""
    corpus = tmp_path / "notes"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"note{i}.md").write_text(f"Note {i}: the quick brown fox {i * 7} jumps.\n" * 3)
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--corpus", str(corpus), "--vocab-size", "8000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])},
    )
    assert done.returncode == 2
    (error,) = [
        line for line in done.stderr.splitlines() if line.startswith("error: ")
    ]  # after Prefect's own log
    assert "fewer than vocab_size 8000" in error and "--vocab-size" in error, done.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("tokenizer/*"))  # nothing a later stage could take for finished


def test_cpu_preset_trains_in_bf16_only_on_a_cpu_with_bf16_arithmetic(monkeypatch):
    from llmcore import presets

    for has_bf16, gpu, precision, steps in (
        (True, False, "bf16", 1921),
        (False, False, "auto", 1634),
        (True, True, "auto", 1634),  # training runs on the GPU
    ):
        monkeypatch.setattr(presets, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        monkeypatch.setattr(presets.torch.cuda, "is_available", lambda gpu=gpu: gpu)
        preset = presets.get_preset("cpu")
        assert (preset.pretrain.precision, preset.pretrain.max_steps) == (precision, steps)
        assert preset.finetune.precision == preset.classify_train.precision == precision
