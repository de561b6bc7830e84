"""Hugging Face export: `transformers` loads the folder and computes what llmcore computes.

A tiny GQA model (random weights, random norm scales, a RoPE base other than the default) and a small
BPE tokenizer are built here; the exported folder is loaded with AutoModelForCausalLM and AutoTokenizer
and compared on logits, greedy generation, token ids and decoded text.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcore.artifacts import file_digest, read_json
from llmcore.checkpoint import save_model
from llmcore.errors import ConfigError
from llmcore.export import export_hf
from llmcore.model import GPT, GPTConfig
from llmcore.sampling import SamplingConfig, generate
from llmcore.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from tests.test_tokenizer import (
    SNIPPETS,
    WHITESPACE,
    random_text,
    source_documents,
    write_corpus,
)

TRICKY = [
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "a\tb\t\tc",
    "\t\tindented with tabs\n",
    "def f(x):\n    if x:\n        return x\n",
    "line\r\nwindows\r\nold mac\rend",
    "\n\n\n",
    "   \n   \n",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷",
    "中文字 日本語のテキスト 한국어",
    "e\u0301 a\u0300\u0316 combining",
    "zero\u200bwidth\u200djoiner",
    "\ufeffbom",
    "nul\x00byte",
    "▁ literal lower eighth block ▁▁",
    "a▁b",
    "<|endoftext|> <|user|> <|assistant|> <|end|> <unk> <0x41>",
    "x" * 300,
    " " * 64,
    "12345 3.14159",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-tok")
    docs = source_documents()
    corpus = write_corpus(root / "corpus", docs[1:], docs[:1])
    train_tokenizer(corpus, root / "tokenizer", TokenizerConfig(vocab_size=1024, num_threads=2))
    return root / "tokenizer"


def tiny_model(vocab_size: int, tie_embeddings: bool, qk_norm: bool = False) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        rope_theta=5000.0,
        tie_embeddings=tie_embeddings,
        qk_norm=qk_norm,
    )
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # norms start at 1: make them differ so that a swapped norm shows
                param.uniform_(0.5, 1.5)
            else:  # larger than the init so that attention is not uniform and greedy output varies
                param.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(
    scope="module", params=[(True, False), (False, False), (True, True)], ids=["tied", "untied", "qk_norm"]
)
def exported(request, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tied, qk_norm = request.param
    model = tiny_model(Tokenizer.load(tokenizer_dir).vocab_size, tie_embeddings=tied, qk_norm=qk_norm)
    save_model(root / "model.pt", model)
    manifest = export_hf(root / "model.pt", tokenizer_dir, root / "hf")
    return model, root, manifest


@pytest.fixture(scope="module")
def tied_export(tokenizer_dir, tmp_path_factory):
    """One export, for the tests that need only one (the tokenizer files do not depend on the model)."""
    root = tmp_path_factory.mktemp("export-tied")
    model = tiny_model(Tokenizer.load(tokenizer_dir).vocab_size, tie_embeddings=True)
    save_model(root / "model.pt", model)
    export_hf(root / "model.pt", tokenizer_dir, root / "hf")
    return model, root


@pytest.fixture(scope="module")
def hf_tokenizer(tied_export):
    return AutoTokenizer.from_pretrained(tied_export[1] / "hf")


def test_logits_equal_ours(exported):
    model, root, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    architecture = "Qwen3ForCausalLM" if model.config.qk_norm else "LlamaForCausalLM"
    assert type(hf).__name__ == architecture and hf.dtype == torch.float32
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == model.config.tie_embeddings
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size), generator=generator)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logit difference: {diff:.3g} (logits std {ours.std().item():.3g})")
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_greedy_generation_matches_token_for_token(exported, tokenizer_dir, hf_tokenizer):
    model, root, _ = exported
    tokenizer = Tokenizer.load(tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    prompt = tokenizer.encode("def fibonacci(n):\n    ")
    assert hf_tokenizer(["def fibonacci(n):\n    "]).input_ids[0] == prompt
    ours = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0))
    # transformers stops at any of the exported end ids; ours was asked not to stop at all.
    stops = {tokenizer.eot_id, tokenizer.end_id}
    expected = next((ours[: i + 1] for i, t in enumerate(ours) if t in stops), ours)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
        )
    assert out[0, len(prompt) :].tolist() == expected
    assert len(set(expected)) > 1  # a real continuation, not one token repeated


def _agree(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert hf(text).input_ids == ids, repr(text)
    assert hf.decode(ids) == ours.decode(ids) == text, repr(text)


def test_tokenizers_agree_on_tricky_and_random_text(tokenizer_dir, hf_tokenizer):
    ours = Tokenizer.load(tokenizer_dir)
    rng = random.Random(0)
    texts = TRICKY + SNIPPETS + WHITESPACE + [random_text(rng) for _ in range(500)] + source_documents()[:1]
    for text in texts:
        _agree(ours, hf_tokenizer, text)
    print(f"tokenizers agree on {len(texts)} of {len(texts)} texts")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_tokenizers_agree_on_any_text(tokenizer_dir, hf_tokenizer, text):
    _agree(Tokenizer.load(tokenizer_dir), hf_tokenizer, text)


def test_control_symbols_are_ids_not_text(tokenizer_dir, hf_tokenizer):
    ours = Tokenizer.load(tokenizer_dir)
    assert hf_tokenizer.eos_token_id == hf_tokenizer.pad_token_id == ours.eot_id
    assert hf_tokenizer.convert_tokens_to_ids("<|end|>") == ours.end_id
    assert ours.eot_id not in hf_tokenizer("<|endoftext|>").input_ids  # text cannot inject them
    assert hf_tokenizer.decode([ours.eot_id, *ours.encode("x")], skip_special_tokens=True) == "x"


def test_folder_files_and_manifest(exported, tokenizer_dir):
    model, root, manifest = exported
    hf = root / "hf"
    names = {p.name for p in hf.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "manifest.json",
    }
    assert read_json(hf / "manifest.json") == json.loads(json.dumps(manifest))
    assert manifest["source_model_digest"] == file_digest(root / "model.pt")
    assert manifest["tokenizer_digest"] == file_digest(tokenizer_dir / "tokenizer.model")
    norms = 2 * model.config.n_layer * model.config.head_dim if model.config.qk_norm else 0  # Qwen3's, ones
    assert manifest["parameters"] == model.num_params() + norms
    assert set(manifest["versions"]) == {"torch", "sentencepiece", "safetensors"}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bad_inputs_fail_in_one_line_and_keep_the_old_folder(tied_export, tokenizer_dir, tmp_path):
    model, root = tied_export
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old export")
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    (tmp_path / "junk.pt").write_text("not a torch file")
    other = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=1, n_head=2, n_embd=32))
    save_model(tmp_path / "other.pt", other)
    unigram = tmp_path / "unigram"
    unigram.mkdir()
    (unigram / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    meta = read_json(tokenizer_dir / "manifest.json")
    meta["config"]["model_type"] = "unigram"
    (unigram / "manifest.json").write_text(json.dumps(meta))
    cases = [
        (tmp_path / "missing.pt", tokenizer_dir, "does not exist"),
        (tmp_path / "junk.pt", tokenizer_dir, "is not a llmcore model"),
        (tmp_path / "checkpoint.pt", tokenizer_dir, "has no model_config"),
        (tmp_path / "other.pt", tokenizer_dir, "vocab_size 512 != tokenizer's 1024"),
        (root / "model.pt", tmp_path, "no finished tokenizer"),
        (root / "model.pt", unigram, "unigram model"),
    ]
    for model_file, tok_dir, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            export_hf(model_file, tok_dir, out)
        assert "\n" not in str(error.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_command_line_exports_without_transformers_and_fails_in_one_line(
    tied_export, tokenizer_dir, tmp_path
):
    _, root = tied_export
    code = (
        "import sys; from llmcore.export import main; main(sys.argv[1:]); "
        "assert 'transformers' not in sys.modules, 'export imported transformers'"
    )
    args = [
        "--model",
        str(root / "model.pt"),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(tmp_path / "hf"),
    ]
    done = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source_model_digest"] == file_digest(root / "model.pt")
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    args[1] = str(tmp_path / "missing.pt")
    failed = subprocess.run(
        [sys.executable, "-m", "llmcore.export", *args], check=False, capture_output=True, text=True
    )
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "missing.pt does not exist" in failed.stderr, failed.stderr


@pytest.mark.flow
def test_flow_logs_the_folder_to_the_run_and_it_loads_from_there(
    prefect_harness, tied_export, tokenizer_dir, tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from flows.export import export_flow
    from tasks.tracking import configure_tracking, experiment_id

    model, root = tied_export
    monkeypatch.chdir(tmp_path)  # mlruns/ and runs/ land here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure_tracking()
    run_id = MlflowClient().create_run(experiment_id("export-test")).info.run_id

    result = export_flow(str(root / "model.pt"), str(tokenizer_dir), run_id=run_id)
    assert result["artifact_uri"] == f"runs:/{run_id}/hf_export"
    assert Path(result["hf_dir"]).parent == Path("runs") / "hf_export"
    logged = {Path(f.path).name for f in MlflowClient().list_artifacts(run_id, "hf_export")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= logged
    downloaded = download_artifacts(result["artifact_uri"], dst_path=str(tmp_path / "downloaded"))
    hf = AutoModelForCausalLM.from_pretrained(downloaded)  # from the tracking store, not the export folder
    idx = torch.arange(16).view(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx)[0], rtol=0, atol=1e-5)

    own = export_flow(str(root / "model.pt"), str(tokenizer_dir), out=str(tmp_path / "own"))  # no run given
    assert own["hf_dir"] == str(tmp_path / "own") and "/hf_export" in own["artifact_uri"]
    assert not (tmp_path / "mlflow.db").exists()


def test_flow_command_line_fails_in_one_line(tokenizer_dir, tmp_path):
    args = ["--model", str(tmp_path / "missing.pt"), "--tokenizer", str(tokenizer_dir)]
    failed = subprocess.run(
        [sys.executable, "-m", "flows.export", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "missing.pt does not exist" in failed.stderr, failed.stderr
