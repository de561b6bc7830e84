"""Data past one machine's memory and cores: ingestion reads tables in record batches; ingestion and
encoding run in parts whose output is the same bytes however many parts there are and wherever they ran
(one process, local processes, child interpreters, Prefect tasks on threads, Prefect tasks on a two-CPU
Ray)."""

import errno
import json
import sysconfig
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmcore import corpus
from llmcore.corpus import CorpusConfig, ingest, read_documents
from llmcore.errors import ConfigError
from llmcore.tokenizer import TokenizerConfig, encode_corpus, plan_encoding, train_tokenizer

ROWS, ROW_CHARS = 1500, 10_000


def _texts() -> list[str]:
    return [f"row {i}: " + chr(0x41 + i % 26) * ROW_CHARS for i in range(ROWS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A small stdlib corpus (about 600 KB in 60 documents) and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("stream")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:60]
    (root / "src").mkdir()
    for path in files:
        (root / "src" / path.name).write_bytes(path.read_bytes())
    ingest(CorpusConfig(source=str(root / "src"), validation_fraction=0.1), root / "corpus")
    train_tokenizer(root / "corpus", root / "tokenizer", TokenizerConfig(vocab_size=400, num_threads=1))
    return {"corpus": root / "corpus", "tokenizer": root / "tokenizer", "root": root}


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.bin"))}


def _ingested_in_bounded_memory(source: str, out: Path, batch_rows: int, monkeypatch) -> int:
    """Peak Python memory of ingesting `source` with `batch_rows` rows per record batch."""
    monkeypatch.setattr(corpus, "TABLE_BATCH_ROWS", batch_rows)
    tracemalloc.start()
    try:
        ingest(CorpusConfig(source=source), out)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_table_files_and_hf_rows_stream_in_batches_in_order_and_bounded_memory(tmp_path, monkeypatch) -> None:
    import datasets

    texts = _texts()
    table = pa.table({"text": texts, "n": list(range(ROWS))})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=300)  # batches cross row groups
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    table.to_pandas().to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    table.to_pandas().to_csv(tmp_path / "rows.csv", index=False)
    total = sum(len(t) for t in texts)  # 15 MB, ASCII
    sources = [(str(tmp_path / f"rows.{kind}"), f"rows.{kind}") for kind in ("parquet", "jsonl", "csv")]
    for source, name in (*sources, (f"hf:{tmp_path}/saved", None)):
        out = tmp_path / f"out-{len(str(name))}"
        peak = _ingested_in_bounded_memory(source, out, 10, monkeypatch)
        assert peak < total / 4, (source, peak, total)  # a whole table in memory would take > total
        docs = [d for split in ("train", "validation") for d in read_documents(out, split)]
        assert sorted(d["text"] for d in docs) == sorted(texts)
        prefix = name or source
        assert all(d["source"] == f"{prefix}#{texts.index(d['text'])}" for d in docs[:50])


def test_a_table_file_broken_after_its_first_rows_is_one_line_and_one_broken_before_them_is_skipped(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(corpus, "TABLE_BATCH_ROWS", 10)
    rows = "".join(f'{{"text": "row {i}"}}\n' for i in range(25))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "late.jsonl").write_text(rows + "{not json\n")
    with pytest.raises(
        ConfigError, match=r"corpus file late.jsonl is corrupt after row 20 .*: repair or remove"
    ):
        ingest(CorpusConfig(source=str(tmp_path / "bad")), tmp_path / "out")
    (tmp_path / "bad" / "late.jsonl").write_text("{not json\n" + rows)
    (tmp_path / "bad" / "notes").write_text("some text that is a document\n")
    manifest = ingest(CorpusConfig(source=str(tmp_path / "bad")), tmp_path / "out")
    assert manifest["skipped_by_reason"] == {"invalid_table": 1} and manifest["counts"]["documents"] == 1


def test_parquet_without_the_text_column_names_its_columns(tmp_path) -> None:
    pq.write_table(pa.table({"body": ["a b c"] * 3}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"no column 'text' \(columns: body\): pass --text-column"):
        ingest(CorpusConfig(source=str(tmp_path / "t.parquet")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parts_cover_every_line_once_and_give_the_same_shards(data, tmp_path) -> None:
    for parts in (1, 3, 50):
        plan = plan_encoding(data["corpus"], parts, max_part_bytes=1 << 30)
        for split in ("train", "validation"):
            mine = [p for p in plan if p.split == split]
            text = (data["corpus"] / f"{split}.jsonl").read_bytes()
            assert [p.index for p in mine] == list(range(len(mine)))
            assert b"".join(text[p.start : p.end] for p in mine) == text
            assert all(p.start == 0 or text[p.start - 1 : p.start] == b"\n" for p in mine)
        cut = len([p for p in plan if p.split == "train"])
        assert cut == parts if parts <= 3 else 3 < cut <= parts  # fewer where one document spans a cut
    one = encode_corpus(data["corpus"], data["tokenizer"], tmp_path / "one", shard_tokens=5000)
    two = encode_corpus(data["corpus"], data["tokenizer"], tmp_path / "two", shard_tokens=5000, workers=3)
    assert len(one["splits"]["train"]["files"]) > 3  # parts and shards cut at different places
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")
    assert {k: v for k, v in one.items() if k != "encode_seconds"} == {
        k: v for k, v in two.items() if k != "encode_seconds"
    }
    assert not list((tmp_path / "two").glob(".*"))  # the parts folder is gone


def _corpus_bytes(folder: Path) -> dict[str, bytes]:
    return {split: (Path(folder) / f"{split}.jsonl").read_bytes() for split in ("train", "validation")}


def test_ingestion_parts_give_the_same_corpus_for_files_and_rows(data, tmp_path) -> None:
    import datasets

    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((data["root"] / "src").iterdir()):
        (src / path.name).write_bytes(path.read_bytes())
    (src / "zz_copy.py").write_bytes((src / "abc.py").read_bytes())  # a duplicate in a later part
    (src / "empty").write_text("  \n")
    (src / "blob").write_bytes(b"\x00\x01" * 100)
    files = corpus._resolve(CorpusConfig(source=str(src)))[1]
    for workers in (1, 2, 5):
        plan = corpus.plan_ingestion(files, None, workers)
        assert [(p.start, p.end) for p in plan][0][0] == 0 and plan[-1].end == len(files)
        assert all(a.end == b.start for a, b in zip(plan, plan[1:], strict=False))
        assert len(plan) == 1 if workers == 1 else 1 < len(plan) <= 4 * workers
    assert [(p.start, p.end) for p in corpus.plan_ingestion([], 10, 3)] == [(0, 3), (3, 6), (6, 10)]

    one = ingest(CorpusConfig(source=str(src)), tmp_path / "one")
    many = ingest(CorpusConfig(source=str(src)), tmp_path / "many", workers=3)  # 12 parts, 3 processes
    assert one == many and _corpus_bytes(tmp_path / "one") == _corpus_bytes(tmp_path / "many")
    assert one["counts"]["duplicates_dropped"] == 1 and one["counts"]["empty_dropped"] == 1
    assert one["skipped_by_reason"] == {"binary": 1}
    assert not list((tmp_path / "many").glob(".*"))  # the parts folder is gone

    rows = [doc["text"] for doc in read_documents(tmp_path / "one", "train")][:40]
    datasets.Dataset.from_dict({"text": rows + rows[:3] + [""]}).save_to_disk(str(tmp_path / "saved"))
    config = CorpusConfig(source=f"hf:{tmp_path / 'saved'}")
    by_rows = [ingest(config, tmp_path / f"hf{workers}", workers=workers) for workers in (1, 3)]
    assert by_rows[0] == by_rows[1] and by_rows[0]["counts"]["duplicates_dropped"] == 3
    assert _corpus_bytes(tmp_path / "hf1") == _corpus_bytes(tmp_path / "hf3")


def test_parts_in_children_give_the_corpus_of_one_process(data, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((data["root"] / "src").iterdir()):
        (src / path.name).write_bytes(path.read_bytes())
    (src / "notes").write_text("plain text in a file without a suffix\n" * 50)
    (src / "zz_copy").write_bytes((src / "notes").read_bytes())  # a duplicate in a later part
    (src / "café").write_text("non-ASCII name, text: naïve déjà vu\n" * 20, encoding="utf-8")
    (src / "blob").write_bytes(b"\x00\x01" * 100)
    config, children = CorpusConfig(source=str(src)), []

    def in_children(phase: str, parts: list[corpus.IngestPart], folder: Path) -> list[dict]:
        children.append(len(parts))
        return [corpus.ingest_part_in_child(config, part, phase, folder) for part in parts]

    one = ingest(config, tmp_path / "one")
    apart = ingest(config, tmp_path / "apart", workers=2, map_parts=in_children)
    assert children == [8, 8] and one == apart  # both phases, 4 parts per worker
    assert _corpus_bytes(tmp_path / "apart") == _corpus_bytes(tmp_path / "one")
    assert one["counts"]["duplicates_dropped"] == 1 and one["skipped_by_reason"] == {"binary": 1}
    assert "café" in {
        doc["source"]
        for split in ("train", "validation")
        for doc in read_documents(tmp_path / "apart", split)
    }


def test_a_part_in_a_child_raises_what_it_raised_there(data, tmp_path, monkeypatch, caplog) -> None:
    config, part = CorpusConfig(source=str(data["root"] / "src")), corpus.IngestPart(0, 0, 1)
    with pytest.raises(ConfigError, match="unknown phase 'read'"):
        corpus.ingest_part_in_child(config, part, "read", tmp_path)
    with pytest.raises(FileNotFoundError, match="source_0.json"):  # permanent: not retried
        corpus.ingest_part_in_child(config, part, "scan", tmp_path / "none")

    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "source_0.json").write_text(
        json.dumps({"files": [["a.py", str(data["root"] / "src" / "abc.py")]], "rows": None})
    )
    flaky = "\n".join(  # the child's reads fail with EIO, after a library printed to stdout
        [
            "import errno, json, sys",
            "sys.path[:] = json.loads(sys.argv[1])",
            "import llmcore.corpus as c",
            "def fails(path):",
            "    print('a library talking on stdout')",
            "    raise OSError(errno.EIO, 'Input/output error', str(path))",
            "c.read_bytes = fails",
            "c._serve_part()",
        ]
    )
    monkeypatch.setattr(corpus, "_CHILD", flaky)
    with pytest.raises(OSError, match="Input/output error") as raised:  # transient: retried
        corpus.ingest_part_in_child(config, part, "scan", tmp_path / "parts")
    assert raised.value.errno == errno.EIO and "a library talking on stdout" in caplog.text

    monkeypatch.setattr(corpus, "_CHILD", "import os; os._exit(3)")  # killed, say, by the kernel
    with pytest.raises(RuntimeError, match=r"ingestion part 0 \(scan\) exited 3: no message"):
        corpus.ingest_part_in_child(config, part, "scan", tmp_path / "parts")


@pytest.mark.flow
def test_the_flow_runs_large_local_sources_parts_in_children_with_the_same_corpus(
    data, tmp_path, prefect_harness, monkeypatch
) -> None:
    from flows.runners import CHILD_PARTS_MIN_BYTES, parts_in_children, task_runner_for
    from flows.stages import reading_flow

    assert parts_in_children("local", CHILD_PARTS_MIN_BYTES)
    assert not parts_in_children("local", CHILD_PARTS_MIN_BYTES - 1) and not parts_in_children("local", None)
    assert not parts_in_children("ray", CHILD_PARTS_MIN_BYTES)  # Ray's tasks are processes already
    config = CorpusConfig(source=str(data["root"] / "src"), validation_fraction=0.1)

    def not_here(*args) -> dict:
        raise AssertionError("a part ran in the flow's own process")

    monkeypatch.setattr(corpus, "ingest_part", not_here)  # the child processes import their own
    flow = reading_flow.with_options(task_runner=task_runner_for("local"))
    state = flow(config, corpus.source_digest(config), str(tmp_path), True, return_state=True)
    assert _corpus_bytes(state.result()) == _corpus_bytes(data["corpus"])


@pytest.mark.ray
def test_data_tasks_on_ray_give_the_corpus_and_shards_of_the_default_runner(
    data, tmp_path, prefect_harness
) -> None:
    from flows.runners import task_runner_for
    from flows.stages import encoding_flow, reading_flow

    config = CorpusConfig(source=str(data["root"] / "src"), validation_fraction=0.1)
    digest = corpus.source_digest(config)
    corpora, folders = {}, {}
    for name, init in (("local", None), ("ray", {"num_cpus": 2, "include_dashboard": False})):
        runner = task_runner_for(name, ray_init=init)
        corpora[name] = Path(
            reading_flow.with_options(task_runner=runner)(config, digest, str(tmp_path / name))
        )
        folders[name] = Path(
            encoding_flow.with_options(task_runner=runner)(
                str(data["corpus"]), str(data["tokenizer"]), str(tmp_path / name)
            )
        )
        assert folders[name].parent.parent == corpora[name].parent.parent == tmp_path / name
    assert _corpus_bytes(corpora["ray"]) == _corpus_bytes(corpora["local"]) == _corpus_bytes(data["corpus"])
    assert len(_shard_bytes(folders["local"])) == 2  # train and validation
    assert _shard_bytes(folders["ray"]) == _shard_bytes(folders["local"])


def test_runner_choices_fail_in_one_line() -> None:
    from flows.runners import task_runner_for

    with pytest.raises(ConfigError, match="pass --task-runner ray too"):
        task_runner_for("local", "ray://head:10001")
    with pytest.raises(ConfigError, match="unknown task runner 'dask'"):
        task_runner_for("dask")


def test_an_hf_dataset_that_changes_between_the_plan_and_a_part_stops_in_one_line(tmp_path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["a b c"] * 5}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "source_0.json").write_text('{"files": [], "rows": 7}')  # planned on 7 rows
    config = CorpusConfig(source=f"hf:{tmp_path / 'saved'}")
    with pytest.raises(ConfigError, match="changed while it was being ingested .7 rows, now 5."):
        corpus.ingest_part(config, corpus.IngestPart(0, 0, 7), "scan", tmp_path / "parts")
