"""Property test of ingestion on hostile folders: random bytes, text in mixed encodings, odd file names,
huge lines and empty files. Ingestion never crashes (a ConfigError names the problem), every file is
either read or skipped and counted, and peak memory stays a small multiple of the largest file."""

import shutil
import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcore.corpus import CorpusConfig, ingest, read_documents
from llmcore.errors import ConfigError

ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "latin-1")
MEMORY_FACTOR = (
    12  # the file, its text, UTF-8 bytes, JSON line and split copies: up to 10.6x seen by hypothesis
)
MEMORY_SLACK = 4 << 20  # bookkeeping that does not grow with a file (a first call also imports lazily)

names = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=30
)
names = names.filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)
suffixes = st.sampled_from(["", ".txt", ".md", ".py", ".bin", ".TXT", ". odd"])
texts = st.text(min_size=0, max_size=300)
contents = st.one_of(
    st.binary(max_size=2000).map(lambda b: ("bytes", b)),
    st.tuples(texts, st.sampled_from(ENCODINGS)).map(lambda t: ("text", t[0].encode(t[1], "replace"))),
    st.tuples(st.text(min_size=1, max_size=8), st.integers(1 << 18, 2 << 20)).map(  # one huge line
        lambda t: ("huge", (t[0] * (t[1] // len(t[0].encode()) + 1)).encode()[: t[1]].replace(b"\n", b" "))
    ),
    st.just(("empty", b"")),
    st.binary(min_size=1, max_size=500).map(lambda b: ("nul", b + b"\0" + b)),
)
folders = st.lists(
    st.tuples(names, suffixes, contents), min_size=1, max_size=6, unique_by=lambda f: f[0] + f[1]
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(folders)
def test_ingestion_never_crashes_counts_what_it_skips_and_stays_within_memory(files):
    root = Path(tempfile.mkdtemp())
    try:
        corpus = root / "corpus"
        corpus.mkdir()
        visible = 0
        for name, suffix, (_, data) in files:
            (corpus / (name + suffix)).write_bytes(data)
            visible += not name.startswith(".")
        largest = max(len(data) for *_, (_, data) in files)
        tracemalloc.start()
        try:
            manifest = ingest(CorpusConfig(source=str(corpus)), root / "out")
        except ConfigError as error:
            assert str(error) and "\n" not in str(error)
            assert not (root / "out").exists()
            return
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak <= MEMORY_FACTOR * largest + MEMORY_SLACK, (peak, largest)

        counts = manifest["counts"]
        assert counts["files_seen"] == visible
        assert (
            counts["skipped_files"] == sum(manifest["skipped_by_reason"].values()) == len(manifest["skipped"])
        )
        assert counts["documents_read"] == visible - counts["skipped_files"]  # one document per text file
        assert (
            counts["documents_read"]
            == counts["documents"] + counts["duplicates_dropped"] + counts["empty_dropped"]
        )
        skipped = {s["path"] for s in manifest["skipped"]}
        docs = [d for split in ("train", "validation") for d in read_documents(root / "out", split)]
        for name, suffix, (kind, data) in files:
            if name.startswith("."):
                continue
            if kind == "nul" and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
                assert name + suffix in skipped  # NUL bytes: binary
            # a byte-order mark alone is empty, UTF-16's too
            utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
            text = data.decode("utf-16" if utf16 else "utf-8", "replace").lstrip("\ufeff")
            if kind in ("huge", "text") and text.strip() and name + suffix not in skipped:
                assert (
                    any(d["source"].startswith(name + suffix) for d in docs) or counts["duplicates_dropped"]
                )
        assert counts["train_documents"] >= 1 and counts["validation_documents"] >= 1
    finally:
        shutil.rmtree(root)
