"""Stage 1: ingest a text corpus into deduplicated train/validation JSONL files.

Sources: the running interpreter's standard library (`stdlib`, the default: ~12 MB of Python that needs
no download), a file, folder or glob, or a Hugging Face dataset (`hf:NAME`, a hub name at an optional
pinned revision, a local data folder or a `save_to_disk` folder). A document is a whole text file or one
table row. Its id is the sha256 of its text; documents are deduplicated and split into train/validation by
that id, so a held-out document is always whole and stays held out when other documents are added.

Files are recognised by content, not by name. A folder or glob takes every regular file (names starting
with "." and hidden folders are skipped, symlinked folders are not followed, so links cannot loop);
`.jsonl`/`.csv`/`.parquet` files are tables, every other file is text if it decodes by this rule: UTF-8
(a leading byte-order mark dropped), or UTF-16 when the file starts with a UTF-16 byte-order mark. Files
with NUL bytes, or with more than 10% other control characters (tab, newlines and form feed aside), are
binary. Binary, undecodable, unreadable (vanished, permission denied, a link loop) and non-regular files
(FIFOs, devices) are skipped and counted by reason in the manifest, never fatal. Empty documents and
duplicates are dropped and counted.

Small corpora still get a validation split: when the hash split holds out less than `min_validation_bytes`
(at most half the text), the training documents nearest to being held out are held out too, in a fixed
order; a corpus of one document holds out the tail of that document, cut at a line boundary.

Ingestion streams: it reads the source twice (once to choose, once to write), a document at a time,
so memory stays a small multiple of the largest document, not of the corpus. Both reads run in parts
(runs of files, or of dataset rows) that local processes, Prefect tasks or child interpreters
(`ingest_part_in_child`) take; the output does not depend on how it was split. Table files and `hf:`
datasets are read TABLE_BATCH_ROWS rows at a time (the dataset memory-mapped by `datasets`); in a .jsonl
or .csv file the binary check reads only the first SNIFF_BYTES. The output folder (`train.jsonl`,
`validation.jsonl`, `manifest.json`) is written atomically, one document at a time. It does not clean,
filter or tokenize text.
"""

import argparse
import codecs
import errno
import fnmatch
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmcore.artifacts import (
    MANIFEST,
    atomic_output_dir,
    atomic_write_json,
    is_finished,
    json_digest,
    read_json,
)
from llmcore.cli import add_config_flags
from llmcore.environment import environ_copy
from llmcore.errors import (
    ConfigError,
    flag,
    require_choice,
    require_fraction,
    require_non_negative,
    require_positive,
)

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
TABLE_BATCH_ROWS = 1024  # rows of a table file or hf: dataset held in memory at once
SNIFF_BYTES = 1 << 16  # the start of a .jsonl/.csv file that the decoding rule's binary check reads
SPLITS = ("train", "validation")
# Standard-library folders that hold tests, third-party packages or machine-generated tables (codec maps,
# pydoc's topic dump) rather than human-written library code; generated near-duplicates on both sides of
# the split would also flatter the model against the compressors.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)
# Read errors that can pass on a second try (a flaky disk or network file system): never skipped.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR, errno.EBUSY})
MAX_LISTED_SKIPS = 50
SOURCE_HINT = "pass --corpus stdlib, a file, folder or glob, or hf:NAME"
HUB_PROBE_SECONDS = 3.0
# C0 controls other than tab, newline, vertical tab, form feed and carriage return: text has few of them,
# binary data many (and JSON writes each as six characters).
CONTROL_CHARACTERS = tuple(chr(c) for c in range(32) if chr(c) not in "\t\n\v\f\r") + ("\x7f",)

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pandas is imported where tables are read: a child reading text starts in ~0.1 s
    import pandas as pd


class UnreadableFileError(Exception):
    """A file that is skipped by `ingest`, never fatal there; `reason` is the manifest's count key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class CorpusConfig:
    source: str = "stdlib"  # "stdlib" | a file, folder or glob | "hf:NAME" (datasets.load_dataset)
    text_column: str = "text"  # column holding the text in jsonl/csv/parquet files and HF datasets
    validation_fraction: float = 0.05  # share of documents held out, chosen by document hash
    max_bytes: int | None = (
        None  # keep at most this many bytes of text (documents taken in hash order), None = all
    )
    hf_config: str | None = None  # HF dataset configuration name
    hf_split: str = "train"  # HF split to read
    hf_revision: str | None = None  # HF hub revision to pin (a commit sha, tag or branch); None = the latest
    min_validation_bytes: int = (
        4096  # hold out at least this much text (at most half the corpus), for small corpora
    )

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"corpus source is empty: {SOURCE_HINT}")
        if "://" in self.source:
            raise ConfigError(f"unsupported corpus source {self.source!r} (URLs are not read): {SOURCE_HINT}")
        if self.source.startswith("hf:") and not self.source[3:].strip():
            raise ConfigError("corpus source 'hf:' names no dataset: pass --corpus hf:NAME")
        if not self.text_column:
            raise ConfigError("text_column is empty: pass --text-column with the name of the text column")
        if not self.hf_split:
            raise ConfigError("hf_split is empty: pass --hf-split with a split name such as train")
        if self.hf_revision is not None and not self.hf_revision.strip():
            raise ConfigError(
                "hf_revision is empty: pass --hf-revision with a commit sha, tag or branch, or omit it"
            )
        require_fraction("validation_fraction", self.validation_fraction)
        if self.max_bytes is not None:
            require_positive("max_bytes", self.max_bytes)
            if not isinstance(self.max_bytes, int):
                raise ConfigError(
                    f"max_bytes must be a whole number, got {self.max_bytes!r}: pass --max-bytes N"
                )
        require_non_negative("min_validation_bytes", self.min_validation_bytes)

    @property
    def kind(self) -> str:
        """ "stdlib", "hf" or "path" (a file, folder or glob)."""
        if self.source == "stdlib":
            return "stdlib"
        return "hf" if self.source.startswith("hf:") else "path"


def validation_score(digest_hex: str) -> float:
    """Where the item with this sha256 hex digest falls in [0, 1): held out when below the fraction.

    It reads the last 16 hex digits: max_bytes takes documents in id order, which is by the first digits,
    and a split by those would hold out exactly the documents taken first.
    """
    return int(digest_hex[-16:], 16) / 2**64


def is_validation(digest_hex: str, fraction: float) -> bool:
    """Whether the item with this sha256 hex digest is held out: a pure function of the digest."""
    return validation_score(digest_hex) < fraction


def text_encoding(data: bytes) -> str:
    """The codec of the decoding rule for a file starting with `data`: UTF-16 after a UTF-16 byte-order mark
    (not UTF-32's), else UTF-8 with an optional byte-order mark."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) and not data.startswith(b"\xff\xfe\0\0"):
        return "utf-16"
    return "utf-8-sig"


def decode_text(data: bytes, final: bool = True) -> str:
    """The module's decoding rule: UTF-8 (BOM dropped), or UTF-16 after a UTF-16 BOM; UnreadableFileError
    ("binary" for NUL bytes or more than 10% control characters, "not_text" for other encodings) otherwise.
    With `final` False, `data` is the start of a file: a character cut at its end is left out."""
    text = None
    if text_encoding(data) == "utf-16":
        try:
            text = codecs.getincrementaldecoder("utf-16")().decode(data, final).removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise UnreadableFileError(
                "not_text", f"not UTF-16 despite its byte-order mark ({e.reason})"
            ) from e
    if "\0" in (text or "") or (text is None and b"\0" in data):
        raise UnreadableFileError("binary", "contains NUL bytes")
    if text is None:
        try:
            text = codecs.getincrementaldecoder("utf-8-sig")().decode(data, final)
        except UnicodeDecodeError as e:
            raise UnreadableFileError(
                "not_text", f"not UTF-8 or UTF-16 ({e.reason} at byte {e.start})"
            ) from e
    controls = sum(map(text.count, CONTROL_CHARACTERS))
    if controls * 10 > len(text):
        raise UnreadableFileError("binary", f"{controls} of {len(text)} characters are control characters")
    return text


def read_bytes(path: Path) -> bytes:
    """A regular file's bytes; UnreadableFileError for anything that cannot be read as one.

    The file is opened without blocking and checked after opening, so a FIFO never hangs the read and a
    file replaced by something else between listing and reading is caught. An error that may pass (an
    I/O error, a stale network file handle) is raised as it is, so the caller can retry the whole read.
    """
    with _open_regular(path) as f:
        try:
            return f.read()
        except OSError as e:
            raise _unreadable(e) from e


def _open_regular(path: Path) -> io.BufferedReader:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise _unreadable(e) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableFileError("not_regular", "not a regular file")
    return open(fd, "rb", closefd=True)


def _unreadable(error: OSError) -> OSError:
    """The error to raise for a file that failed to open or read: transient ones as they are (retried by
    the orchestration), the rest as UnreadableFileError (skipped and counted)."""
    if error.errno in TRANSIENT_ERRNOS:
        return error
    return UnreadableFileError("unreadable", error.strerror or type(error).__name__)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library messages can run to many lines)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def read_table(path: Path) -> "pd.DataFrame":
    """A .jsonl/.csv/.parquet file as a DataFrame with text kept verbatim; UnreadableFileError if it is
    not one."""
    return _parse_table(read_bytes(Path(path)), Path(path).suffix.lower())


def _text_table(stream: io.TextIOBase, suffix: str, chunksize: int | None = None):
    """pandas' reader of a .jsonl or .csv text stream with every text kept verbatim: a DataFrame, or with
    `chunksize` an iterator of DataFrames of that many rows."""
    import pandas as pd

    if suffix == ".jsonl":
        # dtype=False: pandas would otherwise turn a text value like "123" into the float 123.0.
        return pd.read_json(stream, lines=True, dtype=False, convert_dates=False, chunksize=chunksize)
    # keep_default_na=False: otherwise cells reading "NA", "null" or "" become NaN.
    return pd.read_csv(stream, dtype=str, keep_default_na=False, chunksize=chunksize)


def _parse_table(data: bytes, suffix: str) -> "pd.DataFrame":
    import pandas as pd

    try:
        if suffix == ".parquet":
            return pd.read_parquet(io.BytesIO(data))
        text = decode_text(data)
        if not text.strip():
            return pd.DataFrame()
        if suffix in (".jsonl", ".csv"):
            return _text_table(io.StringIO(text), suffix)
    except ValueError as e:  # pandas' parser errors and pyarrow's ArrowInvalid are ValueErrors
        raise UnreadableFileError("invalid_table", f"not valid {suffix[1:]}: {first_line(e)}") from e
    except ImportError as e:  # parquet needs pyarrow (or fastparquet), which a minimal install lacks
        raise ConfigError(
            f"reading {suffix} files needs pyarrow ({first_line(e)}): pip install pyarrow"
        ) from e
    raise ConfigError(
        f"unsupported table file suffix {suffix!r}: pass a file ending in {', '.join(TABLE_SUFFIXES)}"
    )


def table_columns(frame: "pd.DataFrame", columns: dict[str, str], where: str) -> list[tuple[str, ...]]:
    """The rows of `frame` restricted to `columns` ({config field: column name}), every value as text.

    Missing values become "" (dropped later as empty); a missing column is a ConfigError naming the flag.
    """
    if not len(frame):
        return []
    for field, column in columns.items():
        if column not in frame.columns:
            available = ", ".join(map(str, frame.columns))
            raise ConfigError(
                f"{where} has no column {column!r} (columns: {available}): "
                f"pass {flag(field)} naming one of them"
            )
    return list(zip(*([_as_text(v) for v in frame[column]] for column in columns.values()), strict=True))


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    import pandas as pd  # after the common case: a table's text

    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (None when it can, or when that cannot be told: a proxy,
    or offline mode already on). A bare TCP connect, so an offline machine is told in seconds rather than
    after datasets' minute of retries."""
    if any(
        os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy")
    ):
        return None
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{url.scheme}://{address[0]} unreachable: {e}")

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(2 * HUB_PROBE_SECONDS)
    return (
        outcome[0]
        if outcome
        else f"{url.scheme}://{address[0]} did not answer in {2 * HUB_PROBE_SECONDS:.0f} s"
    )


def load_hf_table(
    name: str, hf_config: str | None = None, hf_split: str = "train", hf_revision: str | None = None
) -> "pd.DataFrame":
    """One split of a Hugging Face dataset as a DataFrame (held in memory: for small data such as
    instruction pairs; `load_hf_dataset` streams). ConfigErrors as `load_hf_dataset`."""
    return load_hf_dataset(name, hf_config, hf_split, hf_revision).to_pandas()


def load_hf_dataset(
    name: str, hf_config: str | None = None, hf_split: str = "train", hf_revision: str | None = None
):
    """One split of a Hugging Face dataset as a memory-mapped `datasets.Dataset`: a hub name (at
    `hf_revision` when given), a local data folder, or a folder written by `save_to_disk`. Bad names or
    splits and an unreachable hub are ConfigErrors."""
    folder = Path(name)
    saved = (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()
    if not folder.exists() and (why := _hub_unreachable()):
        raise ConfigError(
            f"hf dataset {name!r} needs the Hugging Face hub, and {why}: connect, set HF_HUB_OFFLINE=1 "
            "to use a cached copy, or pass --corpus hf:FOLDER written by Dataset.save_to_disk"
        )
    import datasets  # only hf: sources need it

    if folder.is_dir() and saved:
        if hf_config is not None or hf_revision is not None:
            raise ConfigError(
                f"hf dataset {name} was saved by save_to_disk and has no configs or revisions: "
                "drop --hf-config and --hf-revision"
            )
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if hf_split not in loaded:
                splits = ", ".join(loaded)
                raise ConfigError(
                    f"hf dataset {name} has no split {hf_split!r} (splits: {splits}): pass --hf-split"
                )
            loaded = loaded[hf_split]
    else:
        try:
            loaded = datasets.load_dataset(name, hf_config, split=hf_split, revision=hf_revision)
        except (
            ValueError,
            FileNotFoundError,
            ConnectionError,
        ) as e:  # unknown dataset, config, split; offline
            raise ConfigError(
                f"hf dataset {name!r} could not be loaded ({first_line(e)}): check the name, --hf-config, "
                "--hf-split and --hf-revision"
            ) from e
    return loaded


def _visible_files(root: Path) -> Iterator[Path]:
    """Every file under `root` whose path has no part starting with ".", without following symlinked
    folders (a link to a parent would loop). Symlinks to files are listed; reading them decides."""
    for folder, subfolders, names in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # .git, .venv: tooling
        yield from (Path(folder) / name for name in sorted(names) if not name.startswith("."))


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return root, files


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Does a relative path match a glob pattern, part by part, with "**" for any number of folders?"""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _glob_files(pattern: str) -> tuple[Path, list[Path]]:
    """Files matching `pattern`, and every file under a matching folder. glob.glob is not used: its "**"
    follows symlinked folders and never ends on a link loop."""
    parts = Path(pattern).parts
    plain = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:plain]) if plain else Path(".")
    wanted = parts[plain:]
    files = []
    for path in _visible_files(root) if root.is_dir() else []:
        rel = path.relative_to(root).parts
        if any(_matches(rel[:n], wanted) for n in range(1, len(rel) + 1)):
            files.append(path)
    return root, files


def _resolve(config: CorpusConfig) -> tuple[str, list[tuple[str, Path]]]:
    """A description of the source and its input files as (relative posix path, path), sorted; ConfigError
    for a source that does not exist or holds no file. For hf: the files of a local folder."""
    if config.kind == "stdlib":
        root, files = _stdlib_files()
        description = f"stdlib ({root}, {len(files)} files)"
    elif config.kind == "hf":
        root = Path(config.source[3:])
        files = list(_visible_files(root)) if root.is_dir() else []
        revision = f", revision {config.hf_revision}" if config.hf_revision else ""
        description = f"{config.source} (config {config.hf_config}, split {config.hf_split}{revision})"
        return description, _relative(root, files)
    elif (
        glob.has_magic(config.source) and not Path(config.source).exists()
    ):  # "data[1].txt" may be a real name
        root, files = _glob_files(config.source)
        if not files:
            raise ConfigError(
                f"corpus glob {config.source} matches no files: check the pattern and quote it "
                "so that the shell does not expand it"
            )
        description = f"glob {config.source} ({len(files)} files)"
    else:
        root = Path(config.source)
        if not root.exists():
            raise ConfigError(f"corpus path {config.source} does not exist: {SOURCE_HINT}")
        if not root.is_dir():
            return f"file {config.source}", [(_printable(root.name), root)]
        files = list(_visible_files(root))
        description = f"folder {config.source} ({len(files)} files)"
    if not files:
        raise ConfigError(
            f"corpus {config.source} has no files (names starting with '.' are skipped): {SOURCE_HINT}"
        )
    return description, _relative(root, files)


def _relative(root: Path, files: list[Path]) -> list[tuple[str, Path]]:
    return sorted((_printable(Path(os.path.relpath(p, root)).as_posix()), p) for p in files)


def _printable(name: str) -> str:
    """A file name as valid text, for a document's source: bytes of it that are not UTF-8 (which Python
    keeps as lone surrogates, which no UTF-8 file can hold) written as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _source_digest(config: CorpusConfig, file_digests: list[tuple[str, str]]) -> str:
    return json_digest({"config": asdict(config), "files": sorted(file_digests)})


def _file_digest(path: Path) -> str:
    """sha256 of a regular file read in blocks, or why it cannot be read (so a digest never raises or
    blocks on a FIFO, and a file that becomes readable changes it)."""
    h = hashlib.sha256()
    try:
        with _open_regular(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except UnreadableFileError as e:
        return str(e)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    return h.hexdigest()


def source_digest(config: CorpusConfig) -> str:
    """Content digest of the source and config, for caching: changes when any input file changes. For a hub
    dataset it covers only the name, configuration, split and revision (the hub content is not read)."""
    _, files = _resolve(config)
    return _source_digest(config, [(rel, _file_digest(path)) for rel, path in files])


def source_bytes(config: CorpusConfig) -> int | None:
    """The size of the files a local file, folder or glob source lists, as ingestion lists them (an upper
    bound on its text; 0 for one that cannot be read, such as a dangling link, which ingestion skips); None
    for the stdlib and hf: sources. ConfigError for a source that is not there."""
    _, files = _resolve(config)
    return sum(_file_size(path) for _, path in files) if config.kind == "path" else None


def describe_source(config: CorpusConfig) -> str:
    """A one-line description, e.g. "stdlib (/usr/lib/python3.11, 734 files)"."""
    return _resolve(config)[0]


def _file_documents(
    files: list[tuple[str, Path]], text_column: str, digests: list[tuple[str, str]], skipped: list[dict]
) -> Iterator[tuple[str, str]]:
    """(source, text) of every document, one file in memory at a time; fills `digests` with (relative path,
    sha256) of every file and `skipped` with the files skipped and why."""
    for rel, path in files:
        try:
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                yield from _parquet_documents(path, rel, text_column, digests)
                continue
            if suffix in TABLE_SUFFIXES:
                yield from _text_table_documents(path, rel, suffix, text_column, digests)
                continue
            data = read_bytes(path)
            digests.append((rel, hashlib.sha256(data).hexdigest()))
            text = decode_text(data)
            del data
            yield rel, text
        except UnreadableFileError as e:
            skipped.append({"path": rel, "reason": e.reason, "detail": str(e)})


def _hashed(f: io.BufferedReader) -> str:
    """The sha256 of an open file's bytes, read 1 MiB at a time; the file is left at its start."""
    h = hashlib.sha256()
    try:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    except OSError as e:
        raise _unreadable(e) from e
    f.seek(0)
    return h.hexdigest()


def _text_table_documents(
    path: Path, rel: str, suffix: str, text_column: str, digests: list[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """(source, text) of every row of a .jsonl or .csv file, parsed TABLE_BATCH_ROWS rows at a time from one
    open file (hashed first). The decoding rule and its binary check are applied to the first SNIFF_BYTES;
    UnreadableFileError when the file is not a table before its first rows, ConfigError for a missing
    column or a file that breaks after them (its first rows are already counted by then)."""
    with _open_regular(path) as f:
        digests.append((rel, _hashed(f)))
        head = f.read(SNIFF_BYTES)
        whole = len(head) < SNIFF_BYTES
        text = decode_text(head, final=whole)  # the binary check
        if whole and not text.strip():
            return
        f.seek(0)
        stream = io.TextIOWrapper(f, encoding=text_encoding(head), newline="")
        row = 0
        try:
            for frame in _text_table(stream, suffix, chunksize=TABLE_BATCH_ROWS):
                rows = table_columns(frame, {"text_column": text_column}, f"corpus file {rel}")
                yield from ((f"{rel}#{row + i}", text) for i, (text,) in enumerate(rows))
                row += len(frame)
        except ConfigError:
            raise
        except ValueError as e:  # pandas' parser errors and a UnicodeDecodeError past the first bytes
            if not row:
                raise UnreadableFileError("invalid_table", f"not valid {suffix[1:]}: {first_line(e)}") from e
            raise ConfigError(
                f"corpus file {rel} is corrupt after row {row} ({first_line(e)}): repair or remove it"
            ) from e


def _parquet_documents(
    path: Path, rel: str, text_column: str, digests: list[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """(source, text) of every row of a parquet file, read TABLE_BATCH_ROWS rows of the text column at a
    time from one open file (hashed first, so the digest is of the bytes that are parsed);
    UnreadableFileError when it is not parquet, ConfigError for a missing column or a file corrupt past
    its footer (its first rows are already counted by then)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(
            f"reading .parquet files needs pyarrow ({first_line(e)}): pip install pyarrow"
        ) from e
    with _open_regular(path) as f:
        digests.append((rel, _hashed(f)))
        try:
            table = pq.ParquetFile(f)
        except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError; a bad footer may be an OSError
            raise UnreadableFileError("invalid_table", f"not valid parquet: {first_line(e)}") from e
        if not table.metadata.num_rows:
            return
        columns = [c for c in table.schema_arrow.names if not c.startswith("__index_level_")]
        if text_column not in columns:
            raise ConfigError(
                f"corpus file {rel} has no column {text_column!r} (columns: {', '.join(columns)}): "
                f"pass {flag('text_column')} naming one of them"
            )
        row = 0
        try:
            for batch in table.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[text_column]):
                texts = [_as_text(v) for v in batch.column(0).to_pylist()]
                del batch
                yield from ((f"{rel}#{row + i}", text) for i, text in enumerate(texts))
                row += len(texts)
        except (ValueError, OSError) as e:
            raise ConfigError(
                f"corpus file {rel} is corrupt after row {row} ({first_line(e)}): repair or remove it"
            ) from e


def _hf_documents(dataset, source: str, text_column: str, row: int = 0) -> Iterator[tuple[str, str]]:
    """(source#row, text) of every row of a `datasets.Dataset`, TABLE_BATCH_ROWS rows at a time; rows are
    numbered from `row` (where a part of the dataset starts)."""
    for batch in dataset.select_columns([text_column]).iter(batch_size=TABLE_BATCH_ROWS):
        texts = [_as_text(v) for v in batch[text_column]]
        yield from ((f"{source}#{row + i}", text) for i, text in enumerate(texts))
        row += len(texts)


def _hold_out(selected: dict[str, int], fraction: float, min_bytes: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids): the hash split, then, while validation has fewer than min_bytes and
    train more than half the bytes, the train documents nearest to being held out move to validation."""
    split = {"train": [], "validation": []}
    for doc_id in selected:
        split["validation" if is_validation(doc_id, fraction) else "train"].append(doc_id)
    target = min(min_bytes, sum(selected.values()) // 2)
    held = sum(selected[i] for i in split["validation"])
    nearest = sorted(split["train"], key=validation_score)
    while (
        held < target and len(nearest) > 1 and selected[nearest[0]] <= sum(selected[i] for i in nearest) // 2
    ):
        moved = nearest.pop(0)
        split["validation"].append(moved)
        held += selected[moved]
    if not split["validation"] and len(nearest) > 1:  # one document larger than the rest together
        split["validation"].append(nearest.pop(0))
    return nearest, split["validation"]


def _tail_cut(text: str, fraction: float, min_bytes: int) -> int:
    """Where to cut a lone document: the held-out tail holds about max(fraction, min_bytes) of it, at
    most half, starting at a line when one starts near there."""
    want = max(1, min(max(int(len(text) * fraction), min_bytes), len(text) // 2))
    cut = len(text) - want
    line = text.rfind("\n", 0, cut + 1) + 1  # the start of the line holding the cut
    if line > 0 and text[:line].strip() and text[line:].strip():
        return line
    return cut


@dataclass(frozen=True)
class IngestPart:
    """Consecutive documents of a source, the unit of parallel ingestion: files [start, end) of the source's
    file list (`ingest` writes each part's own slice of it beside the parts), or rows [start, end) of an
    hf: dataset."""

    index: int  # position among the parts: their documents are written in this order
    start: int
    end: int


# Runs one phase of ingestion over the parts, each with `ingest_part`: (phase, parts, parts folder) -> each
# part's result, in order. Local processes by default; the Prefect flow maps a task over the parts.
MapParts = Callable[[str, list[IngestPart], Path], list[dict]]
PHASES = ("scan", "write")
PARTS_PER_WORKER = 4  # file parts per worker, so that a few large files do not leave a worker idle


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # vanished or unreadable: reading it decides how it is counted
        return 0


def plan_ingestion(files: list[tuple[str, Path]], rows: int | None, workers: int) -> list[IngestPart]:
    """Cut a file list into up to PARTS_PER_WORKER * workers runs of consecutive files of about equal bytes
    (one part for one worker), or `rows` dataset rows into `workers` equal runs."""
    require_positive("workers", workers)
    if rows is not None:
        n = max(1, min(workers, rows))
        bounds = [rows * i // n for i in range(n + 1)]
    else:
        n = 1 if workers == 1 else max(1, min(len(files), PARTS_PER_WORKER * workers))
        sizes = [_file_size(path) for _, path in files]
        total, seen, bounds = sum(sizes), 0, [0]
        for i, size in enumerate(sizes[:-1]):
            seen += size
            if len(bounds) < n and seen * n >= total * len(bounds):
                bounds.append(i + 1)
        bounds.append(len(files))
    return [IngestPart(i, start, end) for i, (start, end) in enumerate(itertools.pairwise(bounds))]


def _part_documents(
    config: CorpusConfig, part: IngestPart, folder: Path, digests: list, skipped: list
) -> Iterator[tuple[str, str]]:
    source = read_json(folder / f"source_{part.index}.json")  # its own files only: O(files) over all parts
    if config.kind == "hf":
        dataset = load_hf_dataset(config.source[3:], config.hf_config, config.hf_split, config.hf_revision)
        if len(dataset) != source["rows"]:
            raise ConfigError(
                f"hf dataset {config.source[3:]} changed while it was being ingested ({source['rows']} rows, "
                f"now {len(dataset)}): run again when it is still, or pass --hf-revision to pin one"
            )
        rows = dataset.select(range(part.start, part.end))
        return _hf_documents(rows, config.source, config.text_column, part.start)
    files = [(rel, Path(path)) for rel, path in source["files"]]
    return _file_documents(files, config.text_column, digests, skipped)


def ingest_part(config: CorpusConfig, part: IngestPart, phase: str, folder: Path) -> dict:
    """One phase of ingestion over one part's documents, with the files in `folder` that `ingest` made.

    "scan" writes [id, source, UTF-8 bytes] of each non-empty document to scan_<index>.jsonl and returns
    the files' digests, the files skipped and the documents read and empty. "write" writes the documents
    that assign_<index>.json gives a split (its first copy only) to <split>_<index>.jsonl and returns the
    files' digests (to check the source did not change), and the documents and bytes per split.
    """
    require_choice("phase", phase, PHASES)
    folder = Path(folder)
    digests: list[tuple[str, str]] = []
    skipped: list[dict] = []
    documents = _part_documents(config, part, folder, digests, skipped)
    if phase == "scan":
        read = empty = 0
        with open(folder / f"scan_{part.index}.jsonl", "w", encoding="utf-8") as out:
            for source, text in documents:
                read += 1
                if not text.strip():
                    empty += 1
                    continue
                encoded = text.encode("utf-8")
                out.write(json.dumps([hashlib.sha256(encoded).hexdigest(), source, len(encoded)]) + "\n")
        return {"digests": digests, "skipped": skipped, "documents_read": read, "empty": empty}

    assign = read_json(folder / f"assign_{part.index}.json")
    wanted, lone = assign["documents"], assign["lone"]  # id -> [split, source of its first copy]
    counts, nbytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    lone_ids: dict[str, list[str]] = {split: [] for split in SPLITS}
    with ExitStack() as stack:
        out = {
            split: stack.enter_context(open(folder / f"{split}_{part.index}.jsonl", "w", encoding="utf-8"))
            for split in SPLITS
        }

        def write(split: str, doc_id: str, source: str, text: str, size: int) -> None:
            out[split].write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False))
            out[split].write("\n")  # not appended to the line: that would copy a long document once more
            counts[split] += 1
            nbytes[split] += size

        for source, text in documents:
            if not text.strip():
                continue
            encoded = text.encode("utf-8")
            doc_id = hashlib.sha256(encoded).hexdigest()
            split, owner = wanted.get(doc_id, (None, None))
            if owner != source:
                continue
            if not lone:
                write(split, doc_id, source, text, len(encoded))
                continue
            cut = _tail_cut(text, config.validation_fraction, config.min_validation_bytes)
            if not text[:cut].strip() or not text[cut:].strip():
                raise ConfigError(
                    f"corpus {assign['description']} is one document of {len(text)} characters, too little "
                    "to hold out a validation tail: add text"
                )
            for split, piece, name in (
                ("train", text[:cut], source),
                ("validation", text[cut:], f"{source}#tail"),
            ):
                encoded = piece.encode("utf-8")
                lone_ids[split].append(hashlib.sha256(encoded).hexdigest())
                write(split, lone_ids[split][-1], name, piece, len(encoded))
                del encoded
    return {"digests": digests, "documents": counts, "bytes": nbytes, "lone_ids": lone_ids}


def ingest_part_in_child(config: CorpusConfig, part: IngestPart, phase: str, folder: Path) -> dict:
    """`ingest_part` in a child interpreter that imports only this module (~0.1 s to start), for callers that
    run parts on threads (the flows' local runner): decoding, hashing and JSON hold the interpreter lock, so
    the threads of one process share one core. The child imports from this process's `sys.path`, not from
    its working folder. Raises what `ingest_part` raised there: a ConfigError, or an OSError with its errno
    (so a transient one is retried); RuntimeError for another error, or a child that died."""
    request = {"config": asdict(config), "part": asdict(part), "phase": phase, "folder": str(folder)}
    child = subprocess.run(
        [sys.executable, "-P", "-c", _CHILD, json.dumps(sys.path)],
        input=json.dumps(request),
        capture_output=True,
        encoding="utf-8",
        errors="backslashreplace",
        env=environ_copy(PYTHONIOENCODING="utf-8"),
    )
    for line in child.stderr.splitlines():  # what the part logged
        log.warning("ingestion part %d: %s", part.index, line)
    where = f"ingestion part {part.index} ({phase})"
    try:
        reply = json.loads(child.stdout)
    except ValueError:
        last = (child.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{where} exited {child.returncode}: {last}") from None
    if "result" in reply:
        return reply["result"]
    error = reply["error"]
    if error["type"] == "ConfigError":
        raise ConfigError(error["message"])
    if error["type"] == "OSError":
        raise OSError(error["errno"], error["message"], error["filename"])
    raise RuntimeError(f"{where}: {error['type']}: {error['message']}")


# The child's command line: the caller's sys.path (its argument, as JSON), then the request on stdin.
_CHILD = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); import llmcore.corpus as c; c._serve_part()"
)


def _serve_part() -> None:
    """The child's side of `ingest_part_in_child`: the request as JSON on stdin; on stdout the result, or
    the error, as JSON. Anything the part prints goes to stderr."""
    reply, sys.stdout = sys.stdout, sys.stderr
    request = json.load(sys.stdin)
    try:
        config, part = CorpusConfig(**request["config"]), IngestPart(**request["part"])
        answer = {"result": ingest_part(config, part, request["phase"], Path(request["folder"]))}
    except ConfigError as error:
        answer = {"error": {"type": "ConfigError", "message": str(error)}}
    except OSError as error:
        filename = None if error.filename is None else str(error.filename)
        answer = {
            "error": {
                "type": "OSError",
                "errno": error.errno,
                "message": error.strerror,
                "filename": filename,
            }
        }
    except Exception as error:
        answer = {"error": {"type": type(error).__name__, "message": str(error)}}
    json.dump(answer, reply)


def _in_processes(config: CorpusConfig, workers: int) -> MapParts:
    """A MapParts that runs `ingest_part` in `workers` local processes (in this one when 1)."""

    def run(phase: str, parts: list[IngestPart], folder: Path) -> list[dict]:
        args = ([config] * len(parts), parts, [phase] * len(parts), [folder] * len(parts))
        if workers == 1 or len(parts) == 1:
            return list(map(ingest_part, *args))
        with ProcessPoolExecutor(min(workers, len(parts))) as pool:
            return list(pool.map(ingest_part, *args))

    return run


def ingest(config: CorpusConfig, out_dir: Path, workers: int = 1, map_parts: MapParts | None = None) -> dict:
    """Read, deduplicate and split the source into `out_dir`; return the manifest. ConfigError, with nothing
    written, when the source is missing or holds no readable text or the split would leave train empty.

    The source is read in parts (`plan_ingestion`), twice: each part's documents are scanned for their ids
    and sizes; the parts' scans, in order, choose the documents (the first copy of each) and their splits;
    each part then writes its chosen documents, and the parts' files are joined in order. The output is
    the same bytes however many parts there are and wherever they ran: `workers` local processes (0 = all
    cores), or `map_parts` (Prefect tasks on the flow's task runner).
    """
    require_non_negative("workers", workers)
    workers = workers or len(os.sched_getaffinity(0))
    description, files = _resolve(config)
    import pandas as pd

    versions = {"python": platform.python_version(), "pandas": pd.__version__}
    rows, digests = None, []
    if config.kind == "hf":
        import datasets

        versions["datasets"] = datasets.__version__
        dataset = load_hf_dataset(config.source[3:], config.hf_config, config.hf_split, config.hf_revision)
        if len(dataset) and config.text_column not in dataset.column_names:
            raise ConfigError(
                f"hf dataset {config.source[3:]} has no column {config.text_column!r} "
                f"(columns: {', '.join(dataset.column_names)}): pass {flag('text_column')} naming one of them"
            )
        rows, digests = len(dataset), [(rel, _file_digest(path)) for rel, path in files]
        del dataset
    parts = plan_ingestion(files, rows, workers)
    run_parts = map_parts or _in_processes(config, workers)

    with atomic_output_dir(out_dir) as tmp:
        scratch = Path(tmp / ".parts").absolute()  # the parts' scans and documents, removed once joined
        scratch.mkdir()
        # absolute paths: a part may run in another process, or on another machine that sees them there
        listed = [(rel, os.path.abspath(path)) for rel, path in files]
        for part in parts:
            source = {"files": listed[part.start : part.end] if rows is None else [], "rows": rows}
            atomic_write_json(scratch / f"source_{part.index}.json", source)

        # Pass 1: ids and sizes only, part by part. The first copy of a document wins.
        scans = run_parts("scan", parts, scratch)
        kept: dict[str, tuple[str, int, int]] = {}  # id -> (source, UTF-8 bytes, part)
        skipped = [skip for scan in scans for skip in scan["skipped"]]
        documents_read = sum(scan["documents_read"] for scan in scans)
        empty = sum(scan["empty"] for scan in scans)
        duplicates = 0
        for part in parts:
            for doc_id, source, size in _jsonl(scratch / f"scan_{part.index}.jsonl"):
                if doc_id in kept:
                    duplicates += 1
                else:
                    kept[doc_id] = (source, size, part.index)
        reasons: dict[str, int] = {}
        for skip in skipped:
            reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
        if not kept:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
            raise ConfigError(
                f"corpus {description} has no readable text ({len(skipped)} files skipped: {why}; "
                f"{empty} empty documents): {SOURCE_HINT}"
            )

        # The longest prefix in id order that fits: a pseudo-random sample that only grows as max_bytes grows.
        selected: dict[str, int] = {}
        total = 0
        for doc_id in sorted(kept):
            total += kept[doc_id][1]
            if config.max_bytes is not None and total > config.max_bytes:
                break
            selected[doc_id] = kept[doc_id][1]
        if not selected:
            raise ConfigError(
                f"max_bytes {config.max_bytes} keeps no document (the first in id order has {total} bytes): "
                "pass a larger --max-bytes"
            )
        lone = len(selected) == 1
        if lone:
            train_ids, validation_ids, rule = list(selected), [], "tail of the only document"
        else:
            train_ids, validation_ids = _hold_out(
                selected, config.validation_fraction, config.min_validation_bytes
            )
            moved = sum(not is_validation(i, config.validation_fraction) for i in validation_ids)
            rule = f"hash, {moved} more held out for min_validation_bytes" if moved else "hash"
        if not train_ids:
            raise ConfigError(
                f"splitting {len(selected)} documents gives 0 train and {len(validation_ids)} "
                f"validation documents: "
                f"add documents or lower --validation-fraction (now {config.validation_fraction})"
            )

        # Pass 2: each part writes its chosen documents to their splits; the parts are joined in order.
        assigned: dict[int, dict[str, tuple[str, str]]] = {part.index: {} for part in parts}
        for ids, split in ((train_ids, "train"), (validation_ids, "validation")):
            for doc_id in ids:
                source, _, index = kept[doc_id]
                assigned[index][doc_id] = (split, source)
        for part in parts:
            atomic_write_json(
                scratch / f"assign_{part.index}.json",
                {"documents": assigned[part.index], "lone": lone, "description": description},
            )
        writes = run_parts("write", parts, scratch)
        rewritten = sum(sum(w["documents"].values()) for w in writes)
        if [sorted(map(tuple, w["digests"])) for w in writes] != [
            sorted(map(tuple, s["digests"])) for s in scans
        ] or rewritten != len(selected) + lone:
            raise ConfigError(
                f"corpus {description} changed while it was being ingested: run again when it is still"
            )
        nbytes = {split: sum(w["bytes"][split] for w in writes) for split in SPLITS}
        written = {"train": train_ids, "validation": validation_ids}
        if lone:
            written = {split: [i for w in writes for i in w["lone_ids"][split]] for split in SPLITS}
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "wb") as joined:
                for part in parts:
                    with open(scratch / f"{split}_{part.index}.jsonl", "rb") as piece:
                        shutil.copyfileobj(piece, joined, 1 << 20)
        shutil.rmtree(scratch)
        digests += [tuple(d) for scan in scans for d in scan["digests"]]
        counts = {
            "files_seen": len(files) if config.kind != "hf" else 0,
            "documents_read": documents_read,
            "documents": len(selected),
            "train_documents": len(written["train"]),
            "validation_documents": len(written["validation"]),
            "duplicates_dropped": duplicates,
            "empty_dropped": empty,
            "max_bytes_dropped": len(kept) - len(selected),
            "skipped_files": len(skipped),
        }
        manifest = {
            "kind": config.kind,
            "source": description,
            "config": asdict(config),
            "source_digest": _source_digest(config, digests),
            "counts": counts,
            "skipped_by_reason": reasons,
            "split": rule,
            "bytes": nbytes,
            "skipped": skipped[:MAX_LISTED_SKIPS],
            "content_digest": json_digest({split: sorted(ids) for split, ids in written.items()}),
            "versions": versions,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    log.info(
        "corpus: %d documents -> %d train / %d validation (%d / %d bytes; split: %s); %d files skipped %s",
        len(selected),
        len(written["train"]),
        len(written["validation"]),
        nbytes["train"],
        nbytes["validation"],
        rule,
        len(skipped),
        reasons or "",
    )
    return manifest


def read_documents(corpus_dir: Path, split: str) -> Iterator[dict]:
    """The {"id", "source", "text"} documents of one split of a finished corpus folder, in source order."""
    require_choice("split", split, SPLITS)
    if not is_finished(corpus_dir):
        raise ConfigError(
            f"{corpus_dir} is not a finished corpus (no {MANIFEST}): run python -m llmcore.corpus first"
        )
    return _jsonl(
        Path(corpus_dir) / f"{split}.jsonl"
    )  # a separate generator, so bad input raises here, not lazily


def corpus_digest(corpus_dir: Path) -> str:
    """The content digest of a finished corpus folder; ConfigError unless ingestion finished there."""
    corpus_dir = Path(corpus_dir)
    if not is_finished(corpus_dir) or not all((corpus_dir / f"{split}.jsonl").is_file() for split in SPLITS):
        raise ConfigError(
            f"no finished corpus in {corpus_dir}: run the corpus stage (`python -m llmcore.corpus`) first"
        )
    return read_json(corpus_dir / MANIFEST)["content_digest"]


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmcore.corpus", description="Ingest a corpus as JSONL.")
    parser.add_argument(
        "--source", "--corpus", default=CorpusConfig.source, help="stdlib, a file, folder, glob or hf:NAME"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    parser.add_argument("--workers", type=int, default=0, help="local processes (0 = all cores)")
    add_config_flags(parser, CorpusConfig, skip=("source",))
    args = vars(parser.parse_args(argv))
    try:
        # The imported module's names, not __main__'s: worker processes look parts up by module name.
        from llmcore.corpus import CorpusConfig as Config
        from llmcore.corpus import ingest as importable

        fields = {f: args[f] for f in Config.__dataclass_fields__ if args.get(f) is not None}
        manifest = importable(Config(**fields), args["out"], workers=args["workers"])
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(manifest["source"])
    print(
        json.dumps(
            {
                **manifest["counts"],
                "bytes": manifest["bytes"],
                "split": manifest["split"],
                "skipped_by_reason": manifest["skipped_by_reason"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
