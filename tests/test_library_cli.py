"""llmcore runs by itself: every stage through `python -m llmcore.<module>`, with Prefect, MLflow and
datasets made unimportable, as on a GPU box that has only torch, sentencepiece and pandas."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
BLOCKED = "import sys, runpy; sys.modules.update(prefect=None, mlflow=None, datasets=None); "


def llmcore(module: str, *args: str, returncode: int = 0) -> str:
    code = (
        BLOCKED
        + f"sys.argv = ['{module}', *sys.argv[1:]]; runpy.run_module('llmcore.{module}', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == returncode, done.stderr[-3000:]
    return done.stdout if returncode == 0 else done.stderr


def test_every_stage_runs_from_the_command_line_without_orchestration(tmp_path):
    corpus, tok, tokens, pre, sft, tuned = (
        tmp_path / name for name in ("corpus", "tok", "tokens", "pre", "sft", "ft")
    )
    llmcore("corpus", "--source", "stdlib", "--max-bytes", "1500000", "--out", str(corpus))
    llmcore("tokenizer", "train", "--corpus", str(corpus), "--out", str(tok), "--vocab-size", "512")
    llmcore("tokenizer", "encode", "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(tokens))
    tiny = [
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
        "--eval-batches",
        "2",
        "--device",
        "cpu",
    ]
    llmcore(
        "train",
        "--tokenizer",
        str(tok),
        "--tokens",
        str(tokens),
        "--out",
        str(pre),
        "--max-steps",
        "6",
        *tiny,
    )
    assert json.loads((pre / "manifest.json").read_text())["metrics"]["steps"] == 6
    llmcore("sft_data", "--corpus", str(corpus), "--out", str(sft))
    llmcore(
        "finetune",
        "--base",
        str(pre / "model.pt"),
        "--tokenizer",
        str(tok),
        "--sft",
        str(sft),
        "--out",
        str(tuned),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
    )
    # the same output folder with other data or settings is refused, not silently reused
    refused = llmcore(
        "finetune",
        "--base",
        str(pre / "model.pt"),
        "--tokenizer",
        str(tok),
        "--sft",
        str(sft),
        "--out",
        str(tuned),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--device",
        "cpu",
        returncode=2,
    )
    assert "inputs.max_length" in refused and "Traceback" not in refused
    report = json.loads(
        llmcore(
            "evaluate",
            "--model",
            str(tuned / "model.pt"),
            "--tokenizer",
            str(tok),
            "--tokens",
            str(tokens),
            "--sft",
            str(sft),
            "--max-tokens",
            "2048",
            "--device",
            "cpu",
            "--corpus",
            str(corpus),
            "--cloze-items",
            "16",
        )
    )
    assert report["bpb"] > 0 and report["xz_bpb"] > 0 and report["response_loss"] > 0
    assert report["bpb_strided"] > 0 and report["bpb_stride"] == 32
    assert (
        report["cloze_items"] == 16 and report["cloze_chance"] == 0.25 and 0 <= report["cloze_accuracy"] <= 1
    )
    samples = llmcore(
        "completions",
        "--model",
        str(pre / "model.pt"),
        "--tokenizer",
        str(tok),
        "--corpus",
        str(corpus),
        "--num-prompts",
        "2",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    )
    assert "python parse rate" in samples
