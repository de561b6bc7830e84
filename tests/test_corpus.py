import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from llmcore.corpus import CorpusConfig, describe_source, ingest, is_validation, main, read_documents, source_digest
from llmcore.errors import ConfigError


def write_docs(folder: Path, n: int, suffix: str = ".txt", prefix: str = "doc") -> dict[str, str]:
    """n distinct one-document files; returns {relative path: text}."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = {f"{prefix}{i:03d}{suffix}": f"{prefix} number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(n)}
    for name, text in docs.items():
        (folder / name).write_text(text)
    return docs


def all_documents(out: Path) -> dict[str, list[dict]]:
    return {split: list(read_documents(out, split)) for split in ("train", "validation")}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary folder was left behind"


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """One file of every supported kind, plus a duplicate, empty, binary, latin-1 and ignored files."""
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "a.txt").write_text("alpha text")
    (d / "notes.md").write_text("# Notes\nbeta")
    (d / "code.py").write_text("def f():\n    return 1\n")
    (d / "sub" / "dup.txt").write_text("alpha text")  # duplicate of a.txt
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (d / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (d / "image.png").write_bytes(b"\x89PNG")  # unsupported suffix: ignored in a folder
    (d / ".hidden" / "secret.txt").write_text("hidden text")  # hidden folder: ignored
    rows = [{"text": "row one"}, {"text": "row two"}, {"text": "123"}, {"text": None}]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "numbers.jsonl").write_text('{"text": "0123"}\n')  # pandas would read a numeric-looking column as floats
    (d / "table.csv").write_text("text,n\ncsv one,1\nNA,2\n")
    pd.DataFrame({"text": ["parquet one", "alpha text"]}).to_parquet(d / "table.parquet")  # second row: duplicate
    return d


def test_folder_of_every_kind_gives_exact_counts(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = ingest(CorpusConfig(source=str(mixed), validation_fraction=0.5), out)
    counts = manifest["counts"]
    assert counts["files_seen"] == 11
    assert counts["skipped_files"] == 2
    assert sorted(s["path"] for s in manifest["skipped"]) == ["binary.txt", "latin1.txt"]
    assert counts["documents_read"] == 14  # 5 text files + 5 jsonl rows + 2 csv rows + 2 parquet rows
    assert counts["empty_dropped"] == 2  # empty.txt and the jsonl null
    assert counts["duplicates_dropped"] == 2  # sub/dup.txt and the parquet copy of a.txt
    assert counts["documents"] == 10 == counts["train_documents"] + counts["validation_documents"]
    docs = [d for split in all_documents(out).values() for d in split]
    by_text = {d["text"]: d["source"] for d in docs}
    assert by_text["alpha text"] == "a.txt"  # the first copy in path order is kept
    assert by_text["123"] == "rows.jsonl#2"
    assert by_text["0123"] == "numbers.jsonl#0"  # a numeric-looking text stays text
    assert by_text["NA"] == "table.csv#1"  # pandas' NA parsing is off
    assert by_text["parquet one"] == "table.parquet#0"
    assert by_text["def f():\n    return 1\n"] == "code.py"
    assert manifest["bytes"]["train"] + manifest["bytes"]["validation"] == sum(len(t.encode()) for t in by_text)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))


def test_glob_takes_matching_files_only(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "g" / "nested", 30)
    write_docs(tmp_path / "g", 5, suffix=".md")
    pattern = str(tmp_path / "g" / "**" / "*.txt")
    manifest = ingest(CorpusConfig(source=pattern, validation_fraction=0.3), tmp_path / "out")
    assert manifest["counts"]["files_seen"] == 30
    docs = [d for split in all_documents(tmp_path / "out").values() for d in split]
    assert sorted(d["source"] for d in docs) == sorted(f"nested/{name}" for name in texts)
    assert describe_source(CorpusConfig(source=pattern)).endswith("(30 files)")


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"hf document {i}" for i in range(30)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": texts + [texts[0], ""], "n": list(range(32))}).save_to_disk(str(saved))
    manifest = ingest(CorpusConfig(source=f"hf:{saved}", text_column="body", validation_fraction=0.3), tmp_path / "out")
    assert manifest["kind"] == "hf"
    assert manifest["counts"]["documents"] == 30
    assert (manifest["counts"]["duplicates_dropped"], manifest["counts"]["empty_dropped"]) == (1, 1)
    docs = [d for split in all_documents(tmp_path / "out").values() for d in split]
    assert {d["text"] for d in docs} == set(texts)
    assert {d["source"] for d in docs if d["text"] == "hf document 7"} == {f"hf:{saved}#7"}
    with pytest.raises(ConfigError, match="--text-column"):
        ingest(CorpusConfig(source=f"hf:{saved}"), tmp_path / "bad")
    assert_nothing_written(tmp_path / "bad")


def test_hf_dataset_dict_split_and_local_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    part = datasets.Dataset.from_dict({"text": [f"split doc {i}" for i in range(20)]})
    datasets.DatasetDict({"train": part, "extra": part}).save_to_disk(str(tmp_path / "dict"))
    source = f"hf:{tmp_path / 'dict'}"
    manifest = ingest(CorpusConfig(source=source, hf_split="extra", validation_fraction=0.3), tmp_path / "a")
    assert manifest["counts"]["documents"] == 20
    with pytest.raises(ConfigError, match="--hf-split"):
        ingest(CorpusConfig(source=source, hf_split="nope"), tmp_path / "b")
    # A plain folder of data files goes through datasets.load_dataset.
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "data.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    manifest = ingest(CorpusConfig(source=f"hf:{tmp_path / 'files'}", validation_fraction=0.3), tmp_path / "c")
    assert manifest["counts"]["documents"] == 20
    with pytest.raises(ConfigError, match="--hf-split"):
        ingest(CorpusConfig(source=f"hf:{tmp_path / 'files'}", hf_split="nope"), tmp_path / "d")


def test_split_is_by_whole_document_and_stable_when_documents_are_added(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "c", 60)
    config = CorpusConfig(source=str(tmp_path / "c"), validation_fraction=0.3)
    ingest(config, tmp_path / "first")
    first = all_documents(tmp_path / "first")
    assert first["validation"] and first["train"]
    train_texts = {d["text"] for d in first["train"]}
    for doc in first["validation"]:
        assert doc["text"] == texts[doc["source"]]  # a whole file, never a piece of one
        assert doc["text"] not in train_texts
        assert is_validation(doc["id"], 0.3)
    write_docs(tmp_path / "c", 30, prefix="extra")
    ingest(config, tmp_path / "second")
    second = all_documents(tmp_path / "second")
    for split in ("train", "validation"):
        assert {d["id"] for d in first[split]} < {d["id"] for d in second[split]}


def test_max_bytes_keeps_a_prefix_in_id_order(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(50):
        (folder / f"{i}.txt").write_text(f"{i:04d}" + "x" * 96)  # 100 bytes each
    full = ingest(CorpusConfig(source=str(folder), validation_fraction=0.5), tmp_path / "full")
    small = ingest(CorpusConfig(source=str(folder), validation_fraction=0.5, max_bytes=1050), tmp_path / "small")
    assert small["counts"]["documents"] == 10
    assert small["counts"]["max_bytes_dropped"] == 40
    assert small["counts"]["train_documents"] and small["counts"]["validation_documents"]  # selection is not the split
    assert small["bytes"]["train"] + small["bytes"]["validation"] == 1000
    full_ids = sorted(d["id"] for split in all_documents(tmp_path / "full").values() for d in split)
    small_ids = sorted(d["id"] for split in all_documents(tmp_path / "small").values() for d in split)
    assert small_ids == full_ids[:10]
    assert full["counts"]["documents"] == 50


def test_stdlib_ingest(tmp_path: Path) -> None:
    first = ingest(CorpusConfig(), tmp_path / "a")
    assert first["counts"]["documents"] > 500
    assert first["source"].startswith("stdlib (")
    sources = [d["source"] for split in all_documents(tmp_path / "a").values() for d in split]
    assert all(s.endswith(".py") for s in sources)
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not [s for s in sources if excluded.intersection(s.split("/")[:-1])]
    assert "json/decoder.py" in sources
    second = ingest(CorpusConfig(), tmp_path / "b")
    assert second["content_digest"] == first["content_digest"]


def test_source_digest_follows_content_and_config(tmp_path: Path) -> None:
    write_docs(tmp_path / "c", 20)
    config = CorpusConfig(source=str(tmp_path / "c"), validation_fraction=0.3)
    before = source_digest(config)
    assert source_digest(config) == before
    assert ingest(config, tmp_path / "out")["source_digest"] == before
    assert source_digest(CorpusConfig(source=str(tmp_path / "c"), validation_fraction=0.2)) != before
    (tmp_path / "c" / "doc005.txt").write_text("changed")
    assert source_digest(config) != before


def _folder_without_text(tmp_path: Path) -> str:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob.bin").write_bytes(b"data")
    return str(tmp_path / "src")


def _folder_only_unreadable(tmp_path: Path) -> str:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bin.txt").write_bytes(b"\x00\x00")
    (tmp_path / "src" / "empty.md").write_text("  \n")
    return str(tmp_path / "src")


def _file_with_other_suffix(tmp_path: Path) -> str:
    (tmp_path / "data.json").write_text("{}")
    return str(tmp_path / "data.json")


def _jsonl_without_column(tmp_path: Path) -> str:
    (tmp_path / "data.jsonl").write_text('{"content": "x", "title": "y"}\n')
    return str(tmp_path / "data.jsonl")


def _two_docs(tmp_path: Path) -> str:
    write_docs(tmp_path / "src", 2)
    return str(tmp_path / "src")


@pytest.mark.parametrize(
    ("make_source", "overrides", "match"),
    [
        (lambda p: str(p / "missing"), {}, "does not exist: pass --corpus stdlib"),
        (lambda p: "s3://bucket/data", {}, "unsupported corpus source"),
        (lambda p: "", {}, "empty"),
        (lambda p: "hf:", {}, "hf:NAME"),
        (_folder_without_text, {}, "has no .txt"),
        (lambda p: str(p / "nothing" / "*.txt"), {}, "has no .txt"),
        (_folder_only_unreadable, {}, "no readable text"),
        (_file_with_other_suffix, {}, "pass a file ending in .txt"),
        (_jsonl_without_column, {}, r"columns: content, title\): pass --text-column"),
        (_two_docs, {"validation_fraction": 1e-9}, "0 validation documents: add documents or change --validation-frac"),
        (_two_docs, {"validation_fraction": 1 - 1e-9}, "0 train .*--validation-fraction"),
        (_two_docs, {"max_bytes": 3}, "--max-bytes"),
        (_two_docs, {"max_bytes": 0}, "--max-bytes"),
        (_two_docs, {"max_bytes": -5}, "--max-bytes"),
        (_two_docs, {"validation_fraction": 0.0}, "--validation-fraction"),
        (_two_docs, {"validation_fraction": 1.0}, "--validation-fraction"),
    ],
)
def test_bad_input_raises_config_error_and_writes_nothing(
    tmp_path: Path, make_source: Callable[[Path], str], overrides: dict, match: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        ingest(CorpusConfig(source=make_source(tmp_path), **overrides), out)
    assert_nothing_written(out)


def test_read_documents_refuses_unfinished_folder_and_bad_split(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.jsonl").write_text("")
    with pytest.raises(ConfigError, match="not a finished corpus"):
        read_documents(tmp_path / "half", "train")
    with pytest.raises(ConfigError, match="--split"):
        read_documents(tmp_path / "half", "test")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_docs(tmp_path / "c", 20)
    main(["--source", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--validation-fraction", "0.3"])
    printed = capsys.readouterr().out
    assert '"documents": 20' in printed
    with pytest.raises(SystemExit):
        main(["--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")])
    assert "does not exist" in capsys.readouterr().err
