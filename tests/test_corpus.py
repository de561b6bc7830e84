import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from llmcore.corpus import (
    CorpusConfig,
    describe_source,
    ingest,
    is_validation,
    main,
    read_documents,
    source_bytes,
    source_digest,
)
from llmcore.errors import ConfigError


def write_docs(folder: Path, n: int, suffix: str = ".txt", prefix: str = "doc") -> dict[str, str]:
    """n distinct one-document files; returns {relative path: text}."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = {
        f"{prefix}{i:03d}{suffix}": f"{prefix} number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(n)
    }
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
    """One file of every kind: text with and without suffixes, tables, a duplicate, empty, binary, latin-1,
    UTF-16 and hidden files, a dangling link, a FIFO and a link back to the folder."""
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
    (d / "image.png").write_bytes(b"\x89PNG")  # read by content: not text, skipped
    (d / "LICENSE").write_text("license text without a suffix")
    (d / "utf16.dat").write_bytes("utf sixteen text".encode("utf-16"))  # with its byte-order mark
    (d / "sub" / "gone.txt").symlink_to(d / "missing.txt")  # dangling: unreadable, skipped
    os.mkfifo(d / "pipe")  # reading it would block: skipped as not a regular file
    (d / "sub" / "loop").symlink_to(d)  # a link back up: not followed
    (d / ".hidden" / "secret.txt").write_text("hidden text")  # hidden folder: ignored
    rows = [{"text": "row one"}, {"text": "row two"}, {"text": "123"}, {"text": None}]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "numbers.jsonl").write_text(
        '{"text": "0123"}\n'
    )  # pandas would read a numeric-looking column as floats
    (d / "table.csv").write_text("text,n\ncsv one,1\nNA,2\n")
    pd.DataFrame({"text": ["parquet one", "alpha text"]}).to_parquet(
        d / "table.parquet"
    )  # second row: duplicate
    return d


def test_folder_of_every_kind_gives_exact_counts(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = ingest(CorpusConfig(source=str(mixed), validation_fraction=0.5), out)
    counts = manifest["counts"]
    assert counts["files_seen"] == 16
    assert counts["skipped_files"] == 5
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "binary.txt": "binary",
        "latin1.txt": "not_text",
        "image.png": "not_text",
        "sub/gone.txt": "unreadable",
        "pipe": "not_regular",
    }
    assert manifest["skipped_by_reason"] == {"binary": 1, "not_text": 2, "unreadable": 1, "not_regular": 1}
    regular = [
        Path(folder, name)
        for folder, _, names in os.walk(mixed)  # links to folders are not followed, as ingestion does not
        if ".hidden" not in Path(folder).parts
        for name in names
        if Path(folder, name).is_file()  # not the dangling link or the pipe
    ]
    assert len(regular) == 14 and source_bytes(CorpusConfig(source=str(mixed))) == sum(
        p.stat().st_size for p in regular
    )
    assert counts["documents_read"] == 16  # 7 text files + 5 jsonl rows + 2 csv rows + 2 parquet rows
    assert counts["empty_dropped"] == 2  # empty.txt and the jsonl null
    assert counts["duplicates_dropped"] == 2  # sub/dup.txt and the parquet copy of a.txt
    assert counts["documents"] == 12 == counts["train_documents"] + counts["validation_documents"]
    docs = [d for split in all_documents(out).values() for d in split]
    by_text = {d["text"]: d["source"] for d in docs}
    assert by_text["alpha text"] == "a.txt"  # the first copy in path order is kept
    assert by_text["123"] == "rows.jsonl#2"
    assert by_text["0123"] == "numbers.jsonl#0"  # a numeric-looking text stays text
    assert by_text["NA"] == "table.csv#1"  # pandas' NA parsing is off
    assert by_text["parquet one"] == "table.parquet#0"
    assert by_text["def f():\n    return 1\n"] == "code.py"
    assert by_text["license text without a suffix"] == "LICENSE"
    assert by_text["utf sixteen text"] == "utf16.dat"
    assert manifest["bytes"]["train"] + manifest["bytes"]["validation"] == sum(
        len(t.encode()) for t in by_text
    )
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


def test_a_file_name_that_is_not_utf8_is_ingested_under_a_printable_name(tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    (folder / "plain.txt").write_text("ordinary text in an ordinary name\n" * 20)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9 notes"), "w") as f:  # Latin-1 bytes in the name
        f.write("text whose file name is not UTF-8\n" * 20)
    for source in (folder, os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9 notes"))):
        out = tmp_path / f"out-{len(str(source))}"
        manifest = ingest(CorpusConfig(source=str(source)), out)
        assert manifest["counts"]["skipped_files"] == 0
        names = {d["source"] for split in all_documents(out).values() for d in split}
        assert "caf\\xe9 notes" in names


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"hf document {i}" for i in range(30)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": texts + [texts[0], ""], "n": list(range(32))}).save_to_disk(
        str(saved)
    )
    manifest = ingest(
        CorpusConfig(source=f"hf:{saved}", text_column="body", validation_fraction=0.3), tmp_path / "out"
    )
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
    (tmp_path / "files" / "data.jsonl").write_text(
        "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20))
    )
    manifest = ingest(
        CorpusConfig(source=f"hf:{tmp_path / 'files'}", validation_fraction=0.3), tmp_path / "c"
    )
    assert manifest["counts"]["documents"] == 20
    with pytest.raises(ConfigError, match="--hf-split"):
        ingest(CorpusConfig(source=f"hf:{tmp_path / 'files'}", hf_split="nope"), tmp_path / "d")


def test_split_is_by_whole_document_and_stable_when_documents_are_added(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "c", 60)
    config = CorpusConfig(
        source=str(tmp_path / "c"), validation_fraction=0.3, min_validation_bytes=0
    )  # hash only
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
    small = ingest(
        CorpusConfig(source=str(folder), validation_fraction=0.5, max_bytes=1050), tmp_path / "small"
    )
    assert small["counts"]["documents"] == 10
    assert small["counts"]["max_bytes_dropped"] == 40
    assert (
        small["counts"]["train_documents"] and small["counts"]["validation_documents"]
    )  # selection is not the split
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
    (tmp_path / "src" / "blob.bin").write_bytes(b"\x00data")
    (tmp_path / "src" / ".hidden.txt").write_text("hidden")
    return str(tmp_path / "src")


def _empty_folder(tmp_path: Path) -> str:
    (tmp_path / "src" / ".git").mkdir(parents=True)
    (tmp_path / "src" / ".git" / "HEAD").write_text("ref")
    return str(tmp_path / "src")


def _folder_only_unreadable(tmp_path: Path) -> str:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bin.txt").write_bytes(b"\x00\x00")
    (tmp_path / "src" / "empty.md").write_text("  \n")
    return str(tmp_path / "src")


def _binary_file(tmp_path: Path) -> str:
    (tmp_path / "model.bin").write_bytes(bytes(range(256)))
    return str(tmp_path / "model.bin")


def _one_tiny_document(tmp_path: Path) -> str:
    (tmp_path / "one.txt").write_text("x")
    return str(tmp_path / "one.txt")


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
        (_folder_without_text, {}, r"no readable text \(1 files skipped: 1 binary"),
        (_empty_folder, {}, "has no files"),
        (lambda p: str(p / "nothing" / "*.txt"), {}, "matches no files: check the pattern"),
        (_folder_only_unreadable, {}, "no readable text"),
        (_binary_file, {}, "no readable text"),
        (_one_tiny_document, {}, "too little to hold out a validation tail: add text"),
        (_jsonl_without_column, {}, r"columns: content, title\): pass --text-column"),
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


def test_small_folder_holds_out_the_documents_nearest_the_cut(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "notes", 40)  # ~1.6 KB: the 5% hash split alone may hold out nothing
    config = CorpusConfig(source=str(tmp_path / "notes"), min_validation_bytes=400)
    manifest = ingest(config, tmp_path / "a")
    docs = all_documents(tmp_path / "a")
    held = manifest["bytes"]["validation"]
    assert 400 <= held <= sum(len(t) for t in texts.values()) // 2 + max(map(len, texts.values()))
    assert manifest["counts"]["validation_documents"] == len(docs["validation"]) >= 1
    assert manifest["split"].startswith("hash")
    moved = [d["id"] for d in docs["validation"] if not is_validation(d["id"], config.validation_fraction)]
    if moved:
        assert manifest["split"] == f"hash, {len(moved)} more held out for min_validation_bytes"

        def scores(ds):
            return [int(d["id"][-16:], 16) for d in ds]

        assert max(scores([d for d in docs["validation"] if d["id"] in moved])) < min(scores(docs["train"]))
    assert ingest(config, tmp_path / "b")["content_digest"] == manifest["content_digest"]  # deterministic


def test_two_documents_give_one_each_and_a_folder_of_duplicates_one_split_document(tmp_path: Path) -> None:
    write_docs(tmp_path / "two", 2)
    manifest = ingest(CorpusConfig(source=str(tmp_path / "two"), validation_fraction=1e-9), tmp_path / "a")
    assert (manifest["counts"]["train_documents"], manifest["counts"]["validation_documents"]) == (1, 1)
    (tmp_path / "dups").mkdir()
    text = "".join(f"line {i} of the only note\n" for i in range(100))
    for i in range(5):
        (tmp_path / "dups" / f"copy{i}").write_text(text)
    manifest = ingest(CorpusConfig(source=str(tmp_path / "dups"), min_validation_bytes=300), tmp_path / "b")
    assert manifest["counts"]["duplicates_dropped"] == 4 and manifest["counts"]["documents"] == 1
    assert manifest["split"] == "tail of the only document"
    docs = all_documents(tmp_path / "b")
    (head,), (tail,) = docs["train"], docs["validation"]
    assert head["text"] + tail["text"] == text  # cut at a line boundary, nothing lost
    assert head["text"].endswith("\n") and tail["source"] == "copy0#tail"
    assert 300 <= len(tail["text"]) <= len(text) // 2


def test_symlink_loops_end_and_a_file_replaced_after_listing_is_skipped(tmp_path: Path, monkeypatch) -> None:
    from llmcore import corpus

    root = tmp_path / "loops"
    write_docs(root / "a", 20)
    (root / "a" / "up").symlink_to(root)  # would loop forever if followed
    (root / "a" / "self").symlink_to(root / "a" / "self")  # a link to itself: ELOOP on reading
    for pattern in (str(root), str(root / "**" / "*")):
        manifest = ingest(CorpusConfig(source=pattern), tmp_path / "out")
        assert manifest["counts"]["documents"] == 20
        assert manifest["skipped_by_reason"] == {"unreadable": 1}
    listed = corpus._resolve

    def resolve_then_replace(config):  # a file becomes a folder between listing and reading
        description, files = listed(config)
        victim = root / "a" / "doc003.txt"
        victim.unlink()
        victim.mkdir()
        return description, files

    monkeypatch.setattr(corpus, "_resolve", resolve_then_replace)
    manifest = ingest(CorpusConfig(source=str(root)), tmp_path / "out2")
    assert manifest["counts"]["documents"] == 19
    assert manifest["skipped_by_reason"] == {"unreadable": 1, "not_regular": 1}
