"""Stage 1: ingest a text corpus into deduplicated train/validation JSONL files.

Sources: the running interpreter's standard library (`stdlib`, the default: ~12 MB of Python that needs
no download), a file, folder or glob of .txt/.md/.py/.jsonl/.csv/.parquet files, or a Hugging Face
dataset (`hf:NAME`). A document is a whole text file or one table row. Its id is the sha256 of its text;
documents are deduplicated and split into train/validation by that id, so a held-out document is always
whole and stays held out when other documents are added. Files that are binary or not UTF-8 are skipped
and listed in the manifest, never fatal. The output folder (`train.jsonl`, `validation.jsonl`,
`manifest.json`) is written atomically.

It does not clean, filter or tokenize text, and it holds the corpus in memory: it is meant for corpora of
up to a few GB, not for sharded web-scale data.
"""

import argparse
import glob
import hashlib
import io
import json
import math
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from llmcore.artifacts import MANIFEST, atomic_output_dir, atomic_write_json, file_digest, is_finished, json_digest, read_json
from llmcore.errors import ConfigError, flag, require_choice, require_fraction, require_positive

TEXT_SUFFIXES = (".txt", ".md", ".py")
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
SPLITS = ("train", "validation")
# Standard-library folders that hold tests, third-party packages or machine-generated tables (codec maps,
# pydoc's topic dump) rather than human-written library code; generated near-duplicates on both sides of
# the split would also flatter the model against the compressors.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                                  "encodings", "pydoc_data"})
MAX_LISTED_SKIPS = 50
SOURCE_HINT = "pass --corpus stdlib, a file, folder or glob, or hf:NAME"


class UnreadableFileError(Exception):
    """A file that is binary, not UTF-8 or not a valid table: skipped by `ingest`, never fatal there."""


@dataclass(frozen=True)
class CorpusConfig:
    source: str = "stdlib"  # "stdlib" | a file, folder or glob | "hf:NAME" (datasets.load_dataset)
    text_column: str = "text"  # column holding the text in jsonl/csv/parquet files and HF datasets
    validation_fraction: float = 0.05  # share of documents held out, chosen by document hash
    max_bytes: int | None = None  # keep at most this many bytes of text (documents taken in hash order), None = all
    hf_config: str | None = None  # HF dataset configuration name
    hf_split: str = "train"  # HF split to read

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
        require_fraction("validation_fraction", self.validation_fraction)
        if self.max_bytes is not None:
            require_positive("max_bytes", self.max_bytes)
            if not isinstance(self.max_bytes, int):
                raise ConfigError(f"max_bytes must be a whole number, got {self.max_bytes!r}: pass --max-bytes N")

    @property
    def kind(self) -> str:
        """"stdlib", "hf" or "path" (a file, folder or glob)."""
        if self.source == "stdlib":
            return "stdlib"
        return "hf" if self.source.startswith("hf:") else "path"


def is_validation(digest_hex: str, fraction: float) -> bool:
    """Whether the item with this sha256 hex digest is held out: a pure function of the digest.

    It reads the last 16 hex digits: max_bytes takes documents in id order, which is by the first digits,
    and a split by those would hold out exactly the documents taken first.
    """
    return int(digest_hex[-16:], 16) / 2**64 < fraction


def decode_text(data: bytes) -> str:
    """Strict UTF-8 (a leading byte-order mark is dropped); UnreadableFileError for binary or other encodings."""
    if b"\0" in data:
        raise UnreadableFileError("binary (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnreadableFileError(f"not UTF-8 ({e.reason} at byte {e.start})") from e


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library messages can run to many lines)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def read_table(path: Path) -> pd.DataFrame:
    """A .jsonl/.csv/.parquet file as a DataFrame with text kept verbatim; UnreadableFileError if it is not one."""
    return _parse_table(Path(path).read_bytes(), Path(path).suffix.lower())


def _parse_table(data: bytes, suffix: str) -> pd.DataFrame:
    try:
        if suffix == ".parquet":
            return pd.read_parquet(io.BytesIO(data))
        text = decode_text(data)
        if not text.strip():
            return pd.DataFrame()
        if suffix == ".jsonl":
            # dtype=False: pandas would otherwise turn a text value like "123" into the float 123.0.
            return pd.read_json(io.StringIO(text), lines=True, dtype=False, convert_dates=False)
        if suffix == ".csv":
            # keep_default_na=False: otherwise cells reading "NA", "null" or "" become NaN.
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except ValueError as e:  # pandas' parser errors and pyarrow's ArrowInvalid are ValueErrors
        raise UnreadableFileError(f"not valid {suffix[1:]}: {first_line(e)}") from e
    except ImportError as e:  # parquet needs pyarrow (or fastparquet), which a minimal install lacks
        raise ConfigError(f"reading {suffix} files needs pyarrow ({first_line(e)}): pip install pyarrow") from e
    raise ConfigError(f"unsupported table file suffix {suffix!r}: pass a file ending in {', '.join(TABLE_SUFFIXES)}")


def table_columns(frame: pd.DataFrame, columns: dict[str, str], where: str) -> list[tuple[str, ...]]:
    """The rows of `frame` restricted to `columns` ({config field: column name}), every value as text.

    Missing values become "" (dropped later as empty); a missing column is a ConfigError naming the flag.
    """
    if not len(frame):
        return []
    for field, column in columns.items():
        if column not in frame.columns:
            available = ", ".join(map(str, frame.columns))
            raise ConfigError(
                f"{where} has no column {column!r} (columns: {available}): pass {flag(field)} naming one of them"
            )
    return list(zip(*([_as_text(v) for v in frame[column]] for column in columns.values())))


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def load_hf_table(name: str, hf_config: str | None = None, hf_split: str = "train") -> pd.DataFrame:
    """One split of a Hugging Face dataset as a DataFrame: a hub name, a local data folder, or a folder
    written by `save_to_disk`. Bad names or splits are ConfigErrors; network failures are not."""
    import datasets  # only hf: sources need it

    folder = Path(name)
    saved = (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()
    if folder.is_dir() and saved:
        if hf_config is not None:
            raise ConfigError(f"hf dataset {name} was saved by save_to_disk and has no configs: drop --hf-config")
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if hf_split not in loaded:
                splits = ", ".join(loaded)
                raise ConfigError(f"hf dataset {name} has no split {hf_split!r} (splits: {splits}): pass --hf-split")
            loaded = loaded[hf_split]
    else:
        try:
            loaded = datasets.load_dataset(name, hf_config, split=hf_split)
        except (ValueError, FileNotFoundError) as e:  # unknown dataset, configuration or split
            raise ConfigError(
                f"hf dataset {name!r} could not be loaded ({first_line(e)}): check the name, --hf-config and --hf-split"
            ) from e
    return loaded.to_pandas()


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return root, files


def _folder_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file()]
    # Hidden folders (.git, .venv) hold tooling, not corpus text.
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _glob_files(pattern: str) -> tuple[Path, list[Path]]:
    parts = Path(pattern).parts
    plain = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:plain]) if plain else Path(".")
    files: list[Path] = []
    for match in map(Path, glob.glob(pattern, recursive=True)):
        if match.is_dir():
            files += _folder_files(match)
        elif match.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(match)
    return root, files


def _resolve(config: CorpusConfig) -> tuple[str, list[tuple[str, Path]]]:
    """A description of the source and its input files as (relative posix path, path), sorted; ConfigError
    for a source that does not exist or holds no supported file. For hf: the files of a local folder."""
    if config.kind == "stdlib":
        root, files = _stdlib_files()
        description = f"stdlib ({root}, {len(files)} files)"
    elif config.kind == "hf":
        root = Path(config.source[3:])
        files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        return f"{config.source} (config {config.hf_config}, split {config.hf_split})", _relative(root, files)
    elif glob.has_magic(config.source) and not Path(config.source).exists():  # "data[1].txt" may be a real name
        root, files = _glob_files(config.source)
        description = f"glob {config.source} ({len(files)} files)"
    else:
        root = Path(config.source)
        if not root.exists():
            raise ConfigError(f"corpus path {config.source} does not exist: {SOURCE_HINT}")
        if root.is_file():
            if root.suffix.lower() not in SUPPORTED_SUFFIXES:
                suffixes = ", ".join(SUPPORTED_SUFFIXES)
                raise ConfigError(
                    f"corpus file {config.source} has an unsupported suffix: pass a file ending in {suffixes}"
                )
            return f"file {config.source}", [(root.name, root)]
        files = _folder_files(root)
        description = f"folder {config.source} ({len(files)} files)"
    if not files:
        raise ConfigError(f"corpus {config.source} has no {', '.join(SUPPORTED_SUFFIXES)} files: {SOURCE_HINT}")
    return description, _relative(root, files)


def _relative(root: Path, files: list[Path]) -> list[tuple[str, Path]]:
    return sorted((Path(os.path.relpath(p, root)).as_posix(), p) for p in files)


def _source_digest(config: CorpusConfig, file_digests: list[tuple[str, str]]) -> str:
    return json_digest({"config": asdict(config), "files": sorted(file_digests)})


def source_digest(config: CorpusConfig) -> str:
    """Content digest of the source and config, for caching: changes when any input file changes. For a hub
    dataset it covers only the name, configuration and split (the hub content is not read)."""
    _, files = _resolve(config)
    return _source_digest(config, [(rel, file_digest(path)) for rel, path in files])


def describe_source(config: CorpusConfig) -> str:
    """A one-line description, e.g. "stdlib (/usr/lib/python3.11, 734 files)"."""
    return _resolve(config)[0]


def _read_files(
    files: list[tuple[str, Path]], text_column: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[dict]]:
    """(source, text) documents, (relative path, sha256) of every file, and the skipped files with reasons."""
    documents: list[tuple[str, str]] = []
    digests: list[tuple[str, str]] = []
    skipped: list[dict] = []
    for rel, path in files:
        data = path.read_bytes()
        digests.append((rel, hashlib.sha256(data).hexdigest()))
        suffix = path.suffix.lower()
        try:
            if suffix in TEXT_SUFFIXES:
                documents.append((rel, decode_text(data)))
                continue
            frame = _parse_table(data, suffix)
        except UnreadableFileError as e:
            skipped.append({"path": rel, "reason": str(e)})
            continue
        rows = table_columns(frame, {"text_column": text_column}, f"corpus file {rel}")
        documents += [(f"{rel}#{i}", text) for i, (text,) in enumerate(rows)]
    return documents, digests, skipped


def ingest(config: CorpusConfig, out_dir: Path) -> dict:
    """Read, deduplicate and split the source into `out_dir`; return the manifest. ConfigError, with nothing
    written, when the source is missing or unreadable or a split would be empty."""
    description, files = _resolve(config)
    versions = {"python": platform.python_version(), "pandas": pd.__version__}
    if config.kind == "hf":
        import datasets

        versions["datasets"] = datasets.__version__
        frame = load_hf_table(config.source[3:], config.hf_config, config.hf_split)
        rows = table_columns(frame, {"text_column": config.text_column}, f"hf dataset {config.source[3:]}")
        documents = [(f"{config.source}#{i}", text) for i, (text,) in enumerate(rows)]
        digests, skipped = [(rel, file_digest(path)) for rel, path in files], []
    else:
        documents, digests, skipped = _read_files(files, config.text_column)

    kept: dict[str, tuple[str, str, int]] = {}  # id -> (source, text, UTF-8 bytes); the first copy wins
    empty = duplicates = 0
    for source, text in documents:
        if not text.strip():
            empty += 1
            continue
        encoded = text.encode("utf-8")
        doc_id = hashlib.sha256(encoded).hexdigest()
        if doc_id in kept:
            duplicates += 1
            continue
        kept[doc_id] = (source, text, len(encoded))
    if not kept:
        raise ConfigError(
            f"corpus {description} has no readable text ({len(skipped)} files skipped, {empty} empty documents): "
            + SOURCE_HINT
        )

    # The longest prefix in id order that fits: a pseudo-random sample that only grows as max_bytes grows.
    selected, total = [], 0
    for doc_id in sorted(kept):
        total += kept[doc_id][2]
        if config.max_bytes is not None and total > config.max_bytes:
            break
        selected.append(doc_id)
    if not selected:
        raise ConfigError(
            f"max_bytes {config.max_bytes} keeps no document (the first in id order has {total} bytes): "
            "pass a larger --max-bytes"
        )
    split_ids = {"train": [], "validation": []}
    for doc_id in selected:
        split_ids["validation" if is_validation(doc_id, config.validation_fraction) else "train"].append(doc_id)
    if not split_ids["train"] or not split_ids["validation"]:
        train, validation = len(split_ids["train"]), len(split_ids["validation"])
        raise ConfigError(
            f"splitting {len(selected)} documents gives {train} train and {validation} validation documents: "
            f"add documents or change --validation-fraction (now {config.validation_fraction})"
        )

    with atomic_output_dir(out_dir) as tmp:
        nbytes = {}
        for split, ids in split_ids.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for doc_id in ids:
                    source, text, _ = kept[doc_id]
                    f.write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n")
            nbytes[split] = sum(kept[doc_id][2] for doc_id in ids)
        manifest = {
            "kind": config.kind,
            "source": description,
            "config": asdict(config),
            "source_digest": _source_digest(config, digests),
            "counts": {
                "files_seen": len(files) if config.kind != "hf" else 0,
                "documents_read": len(documents),
                "documents": len(selected),
                "train_documents": len(split_ids["train"]),
                "validation_documents": len(split_ids["validation"]),
                "duplicates_dropped": duplicates,
                "empty_dropped": empty,
                "max_bytes_dropped": len(kept) - len(selected),
                "skipped_files": len(skipped),
            },
            "bytes": nbytes,
            "skipped": skipped[:MAX_LISTED_SKIPS],
            "content_digest": json_digest(split_ids),
            "versions": versions,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def read_documents(corpus_dir: Path, split: str) -> Iterator[dict]:
    """The {"id", "source", "text"} documents of one split of a finished corpus folder, in id order."""
    require_choice("split", split, SPLITS)
    if not is_finished(corpus_dir):
        raise ConfigError(f"{corpus_dir} is not a finished corpus (no {MANIFEST}): run python -m llmcore.corpus first")
    return _jsonl(Path(corpus_dir) / f"{split}.jsonl")  # a separate generator, so bad input raises here, not lazily


def corpus_digest(corpus_dir: Path) -> str:
    """The content digest of a finished corpus folder; ConfigError unless ingestion finished there."""
    corpus_dir = Path(corpus_dir)
    if not is_finished(corpus_dir) or not all((corpus_dir / f"{split}.jsonl").is_file() for split in SPLITS):
        raise ConfigError(f"no finished corpus in {corpus_dir}: run the corpus stage (`python -m llmcore.corpus`) first")
    return read_json(corpus_dir / MANIFEST)["content_digest"]


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def main(argv: list[str] | None = None) -> None:
    defaults = CorpusConfig()
    parser = argparse.ArgumentParser(prog="python -m llmcore.corpus", description="Ingest a corpus as JSONL.")
    parser.add_argument("--source", "--corpus", default=defaults.source, help="stdlib, a file, folder, glob or hf:NAME")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    parser.add_argument("--text-column", default=defaults.text_column)
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--max-bytes", type=int, default=defaults.max_bytes)
    parser.add_argument("--hf-config", default=defaults.hf_config)
    parser.add_argument("--hf-split", default=defaults.hf_split)
    args = parser.parse_args(argv)
    try:
        fields = ("source", "text_column", "validation_fraction", "max_bytes", "hf_config", "hf_split")
        manifest = ingest(CorpusConfig(**{name: getattr(args, name) for name in fields}), args.out)
    except ConfigError as e:
        parser.error(str(e))
    print(manifest["source"])
    print(json.dumps({**manifest["counts"], "bytes": manifest["bytes"]}, indent=2))


if __name__ == "__main__":
    main()
