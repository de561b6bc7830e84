import argparse
import hashlib
import inspect
import json
import random
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

import llmcore.tokenizer as tokenizer_module
from llmcore.artifacts import is_finished
from llmcore.errors import ConfigError
from llmcore.presets import get_preset, with_vocab_size
from llmcore.shards import open_split
from llmcore.tokenizer import (
    ASSISTANT,
    CONTROL_SYMBOLS,
    END,
    EOT,
    MIN_VOCAB_SIZE,
    USER,
    Tokenizer,
    TokenizerConfig,
    encode_corpus,
    main,
    train_tokenizer,
)

WHITESPACE = [
    " ",
    "  ",
    "    ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    "\u3000",
    "\xa0",
    "\u2028",
    "\x0b",
    "\x0c",
    "\x00",
]
SNIPPETS = [
    "def ",
    "return x\n",
    "    ",
    "中文字",
    "😀👍🏽",
    "e\u0301",
    "\ufeff",
    "⁇",
    "▁",
    "a▁b",
    "<|endoftext|>",
    "<|user|>",
    "12345",
    "日本語のテキスト",
]


def write_corpus(folder, train, validation):
    """A corpus folder as llmcore.corpus writes it."""
    folder.mkdir(parents=True)
    for split, texts in (("train", train), ("validation", validation)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text in texts:
                record = {"id": hashlib.sha256(text.encode()).hexdigest(), "source": "test", "text": text}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"content_digest": "digest-of-" + folder.name}))
    return folder


def source_documents():
    """Real Python source (a few stdlib modules, ~330 KB) plus some prose in other scripts."""
    docs = [inspect.getsource(module) for module in (textwrap, argparse, json, random, inspect)]
    docs += [
        "Привет, мир! Как дела?\n" * 20,
        "こんにちは世界。今日はいい天気です。\n" * 20,
        "Ünïcödé façade naïve café\n" * 20,
    ]
    return docs


def random_text(rng):
    parts = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.choice(WHITESPACE))
        elif r < 0.6:
            parts.append(chr(rng.randint(32, 126)))
        elif r < 0.8:
            code = rng.randint(0, 0x10FFFF)
            parts.append(chr(code if not 0xD800 <= code <= 0xDFFF else 0x41))  # lone surrogates are not text
        else:
            parts.append(rng.choice(SNIPPETS))
    return "".join(parts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One corpus and one small BPE tokenizer shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("tok")
    docs = source_documents()
    corpus = write_corpus(root / "corpus", docs[1:], docs[:1])
    manifest = train_tokenizer(corpus, root / "tokenizer", TokenizerConfig(vocab_size=1024, num_threads=2))
    return corpus, root / "tokenizer", manifest


@pytest.fixture(scope="module")
def tok(trained):
    return Tokenizer.load(trained[1])


def test_round_trip_is_exact_for_any_text(tok):
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(3000)]
    texts += [
        "",
        " ",
        "  lead",
        "trail  ",
        "\n\n\n",
        "\tx\r\n\ty",
        "\n    if x:\n        return 1\n",
        "▁▁",
        " ▁ ",
    ]
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch, strict=True):
        assert tok.decode(ids) == text, repr(text)
    assert batch[:50] == [tok.encode(t) for t in texts[:50]]


def test_round_trip_on_held_out_code_and_compression(trained, tok):
    corpus, _, manifest = trained
    held_out = json.loads((corpus / "validation.jsonl").read_text().splitlines()[0])["text"]
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(held_out.encode()) / len(ids) == pytest.approx(manifest["bytes_per_token"], rel=1e-3)
    assert manifest["bytes_per_token"] > 2.5  # BPE merges, not bytes
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any("\n" in p and "▁" in p for p in pieces)  # newline + indentation pieces exist


def test_control_symbols_have_fixed_ids_and_never_come_from_text(tok):
    ids = [tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id]
    assert ids == [1, 2, 3, 4]
    rng = random.Random(7)
    texts = [EOT, USER, ASSISTANT, END, "".join(CONTROL_SYMBOLS), f"a{EOT}b"] + [
        random_text(rng) for _ in range(300)
    ]
    for encoded in tok.encode_batch(texts):
        assert not set(encoded) & set(ids)
    assert tok.decode(tok.encode(EOT)) == EOT


def test_decode_drops_control_ids(tok):
    ids = (
        [tok.user_id]
        + tok.encode("hi there")
        + [tok.end_id, tok.assistant_id]
        + tok.encode("\n  ok")
        + [tok.eot_id]
    )
    assert tok.decode(ids) == "hi there\n  ok"
    assert tok.decode([tok.eot_id]) == ""


def test_token_byte_lengths_sum_to_utf8_length(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[[tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id, 0]].tolist() == [0] * 5
    assert lengths[tok._sp.piece_to_id("<0xE2>")] == 1
    rng = random.Random(99)
    for text in [random_text(rng) for _ in range(500)] + ["▁x", "    def f():\n"]:
        assert lengths[tok.encode(text)].sum() == len(text.encode()), repr(text)


def test_load_accepts_folder_or_model_file_and_explains_missing(trained, tmp_path):
    folder = trained[1]
    assert Tokenizer.load(folder / "tokenizer.model").encode("x = 1") == Tokenizer.load(folder).encode(
        "x = 1"
    )
    with pytest.raises(ConfigError, match="llmcore.tokenizer train"):
        Tokenizer.load(tmp_path)


def test_manifest_records_provenance_and_training_is_deterministic(trained, tmp_path):
    corpus, folder, manifest = trained
    assert is_finished(folder)
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["vocab_size"] == 1024 and manifest["corpus_digest"] == "digest-of-corpus"
    assert manifest["control_ids"] == {EOT: 1, USER: 2, ASSISTANT: 3, END: 4}
    assert manifest["config"]["vocab_size"] == 1024 and manifest["sentencepiece_version"]
    again = train_tokenizer(corpus, tmp_path / "again", TokenizerConfig(vocab_size=1024, num_threads=2))
    assert again["tokenizer_digest"] == manifest["tokenizer_digest"]


def test_a_corpus_over_the_sentence_budget_trains_the_same_tokenizer_in_every_process(tmp_path):
    docs = [f"# copy {copy}\n{text}" for copy in range(3) for text in source_documents()]
    corpus = write_corpus(tmp_path / "corpus", docs, ["print('held out')\n"])
    assert sum(1 for text in docs for _ in tokenizer_module._training_chunks(text)) > 150
    config = TokenizerConfig(vocab_size=512, max_training_sentences=101, num_threads=1)  # the least allowed
    here = train_tokenizer(corpus, tmp_path / "here", config)
    for name in ("there", "elsewhere"):  # sentencepiece's own sampling differed from process to process
        flags = ["--vocab-size", "512", "--max-training-sentences", "101", "--num-threads", "1"]
        command = ["-m", "llmcore.tokenizer", "train", "--corpus", str(corpus), "--out", str(tmp_path / name)]
        subprocess.run([sys.executable, *command, *flags], capture_output=True, check=True)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["tokenizer_digest"] == here["tokenizer_digest"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"vocab_size": 200},
            r"vocab_size 200 does not fit the byte fallback \(256 byte tokens \+ 5 specials\): "
            r"pass --vocab-size >= 261",
        ),
        ({"vocab_size": 0}, "--vocab-size"),
        ({"model_type": "wordpiece"}, "--model-type"),
        ({"max_training_sentences": 0}, "--max-training-sentences"),
        ({"num_threads": -1}, "--num-threads"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TokenizerConfig(**kwargs)


def test_corpus_too_small_for_vocab_fails_cleanly(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", ["def f(x):\n    return x + 1\n" * 400], ["x = 1\n"])
    with pytest.raises(
        ConfigError, match=r"too small for vocab_size 8000: pass a larger corpus or --vocab-size <= \d+$"
    ) as info:
        train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig(vocab_size=8000))
    assert info.value.__cause__ is None and "\n" not in str(info.value)
    assert not (tmp_path / "tok").exists()
    # the suggested size then trains
    suggested = int(str(info.value).rsplit(" ", 1)[1])
    assert (
        train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig(vocab_size=suggested))["vocab_size"]
        == suggested
    )


def test_a_preset_vocabulary_too_large_for_the_corpus_is_fitted_to_it(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus", ["def f(x):\n    return x + 1\n" * 400], ["x = 1\n"])
    gpu = get_preset("gpu")
    config = replace(gpu.tokenizer, num_threads=1)
    assert config.fit_vocab_to_corpus
    strict = replace(config, vocab_size=8000, fit_vocab_to_corpus=False)  # 50,304 > the corpus's bytes
    with pytest.raises(ConfigError, match=r"--vocab-size <= \d+$") as refused:
        train_tokenizer(corpus, tmp_path / "strict", strict)
    most = int(str(refused.value).rsplit(" ", 1)[1])
    assert MIN_VOCAB_SIZE <= most // 64 * 64 < most < 1000  # a few hundred pieces, not 50,304

    with caplog.at_level("INFO", logger="llmcore.tokenizer"):
        manifest = train_tokenizer(corpus, tmp_path / "fitted", config)
    fitted = most // 64 * 64
    assert manifest["vocab_size"] == Tokenizer.load(tmp_path / "fitted").vocab_size == fitted
    assert manifest["config"]["vocab_size"] == config.vocab_size  # what was asked stays on record
    assert f"training vocab_size {fitted}" in caplog.text
    sized = with_vocab_size(gpu, manifest["vocab_size"])  # what the pipeline then trains
    assert sized.model.vocab_size == sized.tokenizer.vocab_size == fitted


def test_vocab_too_small_for_the_corpus_characters(tmp_path):
    many_chars = "".join(chr(0x4E00 + i) for i in range(600)) * 3
    corpus = write_corpus(tmp_path / "corpus", [many_chars], [""])
    with pytest.raises(ConfigError, match=r"pass --vocab-size >= \d+"):
        train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig(vocab_size=300))
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("train", [[], ["", "  "], ["tiny"]])
def test_empty_or_tiny_train_split_fails_before_training(tmp_path, train):
    corpus = write_corpus(tmp_path / "corpus", train, ["x"])
    with pytest.raises(ConfigError, match="bytes of training text, fewer than vocab_size 4096"):
        train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig())
    assert not (tmp_path / "tok").exists()


def test_unfinished_corpus_names_the_stage(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(ConfigError, match="llmcore.corpus"):
        train_tokenizer(tmp_path / "corpus", tmp_path / "tok", TokenizerConfig())


def test_long_lines_are_chunked_not_dropped():
    text = "a" * 10_000 + "\n" + "    b\n" * 2000
    chunks = list(tokenizer_module._training_chunks(text))
    assert "".join(chunks) == text
    assert max(len(c.encode()) for c in chunks) <= tokenizer_module.CHUNK_BYTES
    code_chunks = [c for c in chunks if "b" in c]
    assert len(code_chunks) > 1 and all(c.startswith("\n") for c in code_chunks)  # cuts fall before newlines


def test_encode_corpus_writes_every_document_then_eot(trained, tok, tmp_path):
    corpus, tokenizer_dir, _ = trained
    manifest = encode_corpus(corpus, tokenizer_dir, tmp_path / "shards", shard_tokens=5000)
    assert is_finished(tmp_path / "shards") and manifest["dtype"] == "uint16"
    for split in ("train", "validation"):
        docs = [json.loads(line)["text"] for line in (corpus / f"{split}.jsonl").read_text().splitlines()]
        info = manifest["splits"][split]
        assert info["documents"] == len(docs)
        assert info["bytes"] == sum(len(d.encode()) for d in docs)
        pieces = [piece for d in docs for piece, _ in tokenizer_module.document_pieces(d)]  # long documents
        assert "".join(pieces) == "".join(docs) and (split == "validation" or len(pieces) > len(docs))
        assert info["tokens"] == sum(len(tok.encode(p)) for p in pieces) + len(docs)
        data = open_split(tmp_path / "shards", split)
        assert data.num_tokens == info["tokens"]
        assert all(len(s) <= 5000 for s in data.shards)
        flat = np.concatenate(data.shards)
        ends = np.flatnonzero(flat == tok.eot_id)
        assert len(ends) == len(docs) and ends[-1] == len(flat) - 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        assert [tok.decode(flat[a:b].tolist()) for a, b in zip(starts, ends, strict=True)] == docs
    assert len(manifest["splits"]["train"]["files"]) > 1
    assert manifest["corpus_digest"] == "digest-of-corpus"


def test_encode_corpus_needs_a_trained_tokenizer(trained, tmp_path):
    with pytest.raises(ConfigError, match="llmcore.tokenizer train"):
        encode_corpus(trained[0], tmp_path / "missing", tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_cli_train_then_encode(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", source_documents()[:2], ["print('hello')\n"])
    main(
        [
            "train",
            "--corpus",
            str(corpus),
            "--out",
            str(tmp_path / "tok"),
            "--vocab-size",
            "512",
            "--num-threads",
            "2",
        ]
    )
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 512
    main(
        [
            "encode",
            "--corpus",
            str(corpus),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out",
            str(tmp_path / "shards"),
        ]
    )
    assert json.loads(capsys.readouterr().out)["splits"]["validation"]["documents"] == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "x"), "--vocab-size", "100"])
    assert exit_info.value.code == 2 and "pass --vocab-size >= 261" in capsys.readouterr().err


def test_a_long_document_is_encoded_in_pieces_exactly_and_in_bounded_memory(trained, tok, tmp_path):
    import tracemalloc

    _, tokenizer_dir, _ = trained
    text = "".join(source_documents()) * 12  # real code and some other scripts, ~3.6 MB
    text += "x" * (tokenizer_module.ENCODE_CHARS + 10)  # one line longer than a piece: cut anywhere
    corpus = write_corpus(tmp_path / "corpus", [text], ["a short held-out document"])
    tracemalloc.start()
    try:
        encode_corpus(corpus, tokenizer_dir, tmp_path / "shards")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(text.encode())
    assert size > 3_000_000 and peak < 10 * size, (peak, size)  # unchunked: ~45x (Python ints per token)
    ids = np.concatenate(open_split(tmp_path / "shards", "train").shards)
    assert ids[-1] == tok.eot_id and tok.eot_id not in ids[:-1]
    assert tok.decode(ids[:-1].tolist()) == text
