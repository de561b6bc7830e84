import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from llmcore.artifacts import json_digest
from llmcore.corpus import CorpusConfig, ingest, is_validation, read_documents
from llmcore.errors import ConfigError
from llmcore.sft_data import SFTDataConfig, build_sft_data, docstring_pairs, main, read_pairs

SOURCE = '''import functools


def plain(x):
    """Return x doubled.

        Indented detail.
    """

    # double it
    return 2 * x


def undocumented(y):
    return y


class Box:
    """A box."""

    @functools.cache
    def method(self, n: int) -> int:
        """Add one to n."""
        return n + 1  # trailing comment

    def outer(self):
        """Outer doc."""
        def inner():
            """Inner doc."""
            return 3
        return inner()


async def fetch(url):
    """Fetch url."""
    await something(url)


def only_doc():
    """Nothing else."""


def same_line(): "Docstring on the def line."; return 1
'''


def test_docstring_pairs() -> None:
    pairs = dict(docstring_pairs(SOURCE))
    plain = "Return x doubled.\n\nIndented detail."  # cleaned like inspect.cleandoc
    assert list(pairs) == [plain, "Add one to n.", "Outer doc.", "Inner doc.", "Fetch url."]
    assert pairs[plain] == "def plain(x):\n    # double it\n    return 2 * x"
    method = "@functools.cache\ndef method(self, n: int) -> int:\n    return n + 1  # trailing comment"
    assert pairs["Add one to n."] == method
    assert pairs["Inner doc."] == "def inner():\n    return 3"
    outer = pairs["Outer doc."]
    assert outer.startswith("def outer(self):\n    def inner():") and '"""Inner doc."""' in outer
    assert "Outer doc" not in outer
    assert pairs["Fetch url."] == "async def fetch(url):\n    await something(url)"
    with pytest.raises(SyntaxError):
        docstring_pairs("def broken(:\n")


def python_doc(i: int) -> str:
    body = "\n".join(f"    value = value + {j}" for j in range(80)) if i == 0 else f"    return {i}"
    return (
        f'def func_{i}(value):\n    """Compute thing number {i}."""\n{body}\n\n\n'
        f'def shared():\n    """Shared helper."""\n    return 0\n\n\n# file {i}\n'
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """An ingested corpus of 40 Python files, one that does not parse, and a text file."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"mod{i:02d}.py").write_text(python_doc(i))
    (src / "broken.py").write_text("def broken(:\n")
    (src / "readme.txt").write_text('def looks_like_python():\n    """Not a .py document."""\n    return 1\n')
    ingest(CorpusConfig(source=str(src), validation_fraction=0.3), tmp_path / "corpus")
    return tmp_path / "corpus"


def test_docstring_pairs_follow_the_corpus_split(corpus: Path, tmp_path: Path) -> None:
    manifest = build_sft_data(SFTDataConfig(max_response_chars=500), corpus, tmp_path / "sft")
    counts = manifest["counts"]
    assert (counts["documents_parsed"], counts["documents_failed"]) == (40, 1)
    assert counts["too_long_dropped"] == 1  # func_0's long body
    assert counts["duplicates_dropped"] == 39  # `shared` appears in every file and is kept once
    split_of = {
        d["source"]: split for split in ("train", "validation") for d in read_documents(corpus, split)
    }
    for split in ("train", "validation"):
        pairs = read_pairs(tmp_path / "sft", split)
        assert len(pairs) == counts[f"{split}_pairs"] > 0
        for pair in pairs:
            if pair["prompt"] != "Shared helper.":
                number = int(pair["prompt"].split()[-1].rstrip("."))
                assert split_of[f"mod{number:02d}.py"] == split
                assert pair["response"] == f"def func_{number}(value):\n    return {number}"
    # `shared` is in documents of both splits: it is kept once, in train, so nothing leaks into validation.
    train = read_pairs(tmp_path / "sft", "train")
    assert [p for p in train if p["prompt"] == "Shared helper."] == [
        {"prompt": "Shared helper.", "response": "def shared():\n    return 0"}
    ]
    assert "Shared helper." not in {p["prompt"] for p in read_pairs(tmp_path / "sft", "validation")}
    assert not any("looks_like_python" in p["response"] for p in read_pairs(tmp_path / "sft", "train"))


def test_a_docstring_prompt_in_train_is_never_held_out_with_another_response(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):  # the same docstring over a different body in every file, and one of its own
        planted = f'def helper():\n    """Planted prompt."""\n    return {i}\n'
        (src / f"mod{i:02d}.py").write_text(planted + f'\n\ndef own():\n    """Own {i}."""\n    return 0\n')
    ingest(CorpusConfig(source=str(src), validation_fraction=0.3), tmp_path / "corpus")
    held_out = sum(1 for _ in read_documents(tmp_path / "corpus", "validation"))
    manifest = build_sft_data(SFTDataConfig(), tmp_path / "corpus", tmp_path / "sft")
    train, validation = (read_pairs(tmp_path / "sft", split) for split in ("train", "validation"))
    assert 0 < held_out < 40 and len(validation) == held_out  # only the held-out files' own pairs
    assert [p["prompt"] for p in train].count("Planted prompt.") == 40 - held_out
    assert "Planted prompt." not in {p["prompt"] for p in validation}
    assert manifest["counts"]["prompt_in_train_dropped"] == held_out


def test_user_pairs_are_split_by_prompt_so_a_prompt_stays_on_one_side(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}", "response": f"answer {i}.{k}"} for i in range(40) for k in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build_sft_data(
        SFTDataConfig(source=str(path), validation_fraction=0.3), None, tmp_path / "sft"
    )
    train, validation = (read_pairs(tmp_path / "sft", split) for split in ("train", "validation"))
    assert len(train) + len(validation) == 120 and manifest["counts"]["prompt_in_train_dropped"] == 0
    assert {p["prompt"] for p in train}.isdisjoint(p["prompt"] for p in validation)
    assert len(validation) % 3 == 0 and len(validation) > 0  # each held-out prompt with all its responses


def test_hf_pairs_read_the_split_asked_for(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    split = {
        f"{name}": {"prompt": [f"{name} p{i}" for i in range(30)], "response": ["r"] * 30}
        for name in ("train", "extra")
    }
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in split.items()}).save_to_disk(
        str(tmp_path / "saved")
    )
    config = SFTDataConfig(source=f"hf:{tmp_path / 'saved'}", hf_split="extra", validation_fraction=0.3)
    manifest = build_sft_data(config, None, tmp_path / "sft")
    pairs = read_pairs(tmp_path / "sft", "train") + read_pairs(tmp_path / "sft", "validation")
    assert sorted(p["prompt"] for p in pairs) == sorted(split["extra"]["prompt"])
    assert manifest["inputs"]["hf_split"] == "extra"
    with pytest.raises(ConfigError, match=r"no split 'test' \(splits: train, extra\): pass --hf-split"):
        build_sft_data(replace(config, hf_split="test"), None, tmp_path / "bad")
    with pytest.raises(ConfigError, match="has no configs or revisions"):
        build_sft_data(replace(config, hf_revision="v1"), None, tmp_path / "bad")
    with pytest.raises(ConfigError, match="is not hf:NAME"):
        SFTDataConfig(source="docstrings", hf_split="extra")


def test_user_jsonl_is_split_by_prompt_hash(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    rows += [rows[0], {"prompt": " ", "response": "orphan"}, {"prompt": "no answer", "response": None}]
    rows += [{"prompt": "7", "response": 7}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build_sft_data(
        SFTDataConfig(source=str(path), validation_fraction=0.3), None, tmp_path / "sft"
    )
    counts = manifest["counts"]
    assert (counts["rows_read"], counts["duplicates_dropped"], counts["empty_dropped"]) == (44, 1, 2)
    assert counts["train_pairs"] + counts["validation_pairs"] == 41
    assert manifest["inputs"]["file_digest"]
    for split in ("train", "validation"):
        for pair in read_pairs(tmp_path / "sft", split):
            assert is_validation(json_digest(pair["prompt"]), 0.3) == (split == "validation")
    everything = read_pairs(tmp_path / "sft", "train") + read_pairs(tmp_path / "sft", "validation")
    assert {"prompt": "7", "response": "7"} in everything  # a number in a text column becomes text


def test_user_csv_with_named_columns(tmp_path: Path) -> None:
    questions, answers = [f"q{i}" for i in range(30)] + ["q-na"], [f"a{i}" for i in range(30)] + ["NA"]
    pd.DataFrame({"question": questions, "answer": answers}).to_csv(tmp_path / "pairs.csv", index=False)
    path = str(tmp_path / "pairs.csv")
    config = SFTDataConfig(
        source=path, prompt_column="question", response_column="answer", validation_fraction=0.3
    )
    manifest = build_sft_data(config, None, tmp_path / "sft")
    pairs = read_pairs(tmp_path / "sft", "train") + read_pairs(tmp_path / "sft", "validation")
    assert len(pairs) == manifest["counts"]["train_pairs"] + manifest["counts"]["validation_pairs"] == 31
    assert {"prompt": "q-na", "response": "NA"} in pairs
    with pytest.raises(ConfigError, match=r"columns: question, answer\): pass --prompt-column"):
        build_sft_data(SFTDataConfig(source=str(tmp_path / "pairs.csv")), None, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_user_parquet_and_hf(tmp_path: Path) -> None:
    data = {"prompt": [f"p{i}" for i in range(30)], "response": [f"r{i}" for i in range(30)]}
    pd.DataFrame(data).to_parquet(tmp_path / "p.parquet")
    config = SFTDataConfig(source=str(tmp_path / "p.parquet"), validation_fraction=0.3)
    from_parquet = build_sft_data(config, None, tmp_path / "a")
    assert from_parquet["counts"]["train_pairs"] + from_parquet["counts"]["validation_pairs"] == 30
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "saved"))
    config = SFTDataConfig(source=f"hf:{tmp_path / 'saved'}", validation_fraction=0.3)
    from_hf = build_sft_data(config, None, tmp_path / "b")
    assert from_hf["content_digest"] == from_parquet["content_digest"]


def _two_pairs(tmp_path: Path) -> str:
    (tmp_path / "two.jsonl").write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
    )
    return str(tmp_path / "two.jsonl")


def _latin1_csv(tmp_path: Path) -> str:
    (tmp_path / "l.csv").write_bytes("prompt,response\ncafé,crème\n".encode("latin-1"))
    return str(tmp_path / "l.csv")


@pytest.mark.parametrize(
    ("make_source", "overrides", "match"),
    [
        (lambda p: str(p / "missing.jsonl"), {}, "does not exist"),
        (lambda p: str(p / "pairs.txt"), {}, "not a supported file"),
        (lambda p: "", {}, "empty"),
        (lambda p: "hf:", {}, "hf:NAME"),
        (lambda p: "docstrings", {}, "not a finished corpus"),
        (_latin1_csv, {}, "unreadable"),
        (
            _two_pairs,
            {"validation_fraction": 1e-9},
            "0 validation pairs: add pairs or change --validation-fraction",
        ),
        (_two_pairs, {"max_response_chars": 0}, "--max-response-chars"),
        (_two_pairs, {"prompt_column": "x", "response_column": "x"}, "--prompt-column"),
    ],
)
def test_bad_input_raises_config_error_and_writes_nothing(
    tmp_path: Path, make_source: Callable[[Path], str], overrides: dict, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        config = SFTDataConfig(source=make_source(tmp_path), **overrides)
        build_sft_data(config, tmp_path / "no-corpus", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--corpus", str(corpus), "--out", str(tmp_path / "sft")])
    assert '"documents_parsed": 40' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")])
    assert "not a finished corpus" in capsys.readouterr().err
