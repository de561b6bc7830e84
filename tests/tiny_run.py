"""A tiny but real data chain (corpus, tokenizer, token shards, SFT pairs) and the command lines that train
on it, shared by the security and fault tests. Everything is built by llmcore itself; nothing is faked."""

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from llmcore.environment import environ_copy
from llmcore.sft_data import SFTDataConfig, build_sft_data
from llmcore.tokenizer import TokenizerConfig, encode_corpus, train_tokenizer

ROOT = Path(__file__).parents[1]
# A model big enough that a checkpoint takes a few milliseconds to write, small enough for a CPU test.
MODEL = ["--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "64"]
TRAIN = [
    "--batch-size",
    "4",
    "--eval-batches",
    "1",
    "--eval-interval",
    "100",
    "--log-interval",
    "1",
    "--warmup-steps",
    "2",
    "--device",
    "cpu",
]


def build_data(root: Path) -> dict[str, Path]:
    """corpus/ (two stdlib modules as documents), tokenizer/ (BPE 400), tokens/, sft/ under `root`."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    splits = {"train": [inspect.getsource(argparse)], "validation": [inspect.getsource(textwrap)]}
    for split, texts in splits.items():
        with open(corpus / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"id": hashlib.sha256(t.encode()).hexdigest(), "source": f"{split}.py", "text": t})
                + "\n"
                for t in texts
            )
    (corpus / "manifest.json").write_text(json.dumps({"content_digest": "tiny-corpus"}))
    train_tokenizer(corpus, root / "tokenizer", TokenizerConfig(vocab_size=400, num_threads=1))
    encode_corpus(corpus, root / "tokenizer", root / "tokens")
    build_sft_data(SFTDataConfig(), corpus, root / "sft")
    return {name: root / name for name in ("corpus", "tokenizer", "tokens", "sft")}


def env() -> dict[str, str]:
    """The child's environment: this worktree first on the path, one thread (deterministic and polite)."""
    return {
        **environ_copy(),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }


def pretrain_cmd(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmcore.train",
        "--tokenizer",
        str(data["tokenizer"]),
        "--tokens",
        str(data["tokens"]),
        "--out",
        str(out),
        *MODEL,
        *TRAIN,
        *extra,
    ]


def finetune_cmd(data: dict[str, Path], base: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmcore.finetune",
        "--base",
        str(base),
        "--tokenizer",
        str(data["tokenizer"]),
        "--sft",
        str(data["sft"]),
        "--out",
        str(out),
        *TRAIN,
        *extra,
    ]


def run(cmd: list[str], returncode: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


def weights(model_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_file, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    """Every tensor of the two models' state dicts is exactly equal (bit for bit, not approximately)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name], wb[name]), name
