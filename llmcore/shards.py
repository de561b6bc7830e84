"""The token-shard format: flat arrays of token ids in raw binary files that a data loader memory-maps.

A shards folder holds `{split}_{k:06d}.bin` files, each at most `shard_tokens` ids written with
`ndarray.tofile` (no header, native byte order: little-endian on every machine we target), and one
`manifest.json` giving the dtype and, per split, the files in order with their token counts and sha256
digests (written by `llmcore.tokenizer.encode_corpus`; checked whenever a split is opened). Documents are
concatenated, each followed by the end-of-text id, so a shard boundary may fall inside a document. This
module does not tokenize, batch or shuffle; a training data loader slices the memmaps that `open_split`
returns.
"""

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from llmcore.artifacts import MANIFEST, is_finished, read_json, verify_digest
from llmcore.errors import ConfigError, require_positive

ENCODE_HINT = "python -m llmcore.tokenizer encode --corpus DIR --tokenizer DIR --out"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below `vocab_size`: uint16 up to 65536 ids, else
    uint32."""
    require_positive("vocab_size", vocab_size)
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to `{split}_{k:06d}.bin` files in `folder`, starting a new file every
    `shard_tokens` ids.

    Files are written in place: build the folder inside `atomic_output_dir` so that an interrupted run leaves
    nothing that looks finished. A split with no tokens gets no files (an empty file cannot be memory-mapped).
    """

    def __init__(self, folder: Path, split: str, dtype: npt.DTypeLike, shard_tokens: int = 2**27) -> None:
        require_positive("shard_tokens", shard_tokens)
        self.folder = Path(folder)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self._files: list[dict] = []
        self._handle = None  # the open file of the last shard while it has room
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append `ids` (any integer sequence) after what was written before."""
        ids = np.asarray(ids).ravel()
        # astype would silently wrap an id that does not fit, corrupting the data without a trace.
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(
                f"token ids must lie in [0, {np.iinfo(self.dtype).max}] for {self.dtype}, "
                f"got {ids.min()}..{ids.max()}"
            )
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._handle is None:
                name = f"{self.split}_{len(self._files):06d}.bin"
                self._handle = open(self.folder / name, "wb")
                self._files.append({"file": name, "tokens": 0})
                self._digest = hashlib.sha256()
            shard = self._files[-1]
            room = self.shard_tokens - shard["tokens"]
            ids[:room].tofile(self._handle)
            self._digest.update(ids[:room])
            shard["tokens"] += min(room, ids.size)
            ids = ids[room:]
            if shard["tokens"] == self.shard_tokens:
                self._close_file()

    def _close_file(self) -> None:
        self._handle.close()
        self._handle = None
        self._files[-1]["sha256"] = self._digest.hexdigest()

    def close(self) -> list[dict]:
        """Close the last file; return `[{"file": name, "tokens": n, "sha256": hex}, ...]` in order. Safe to
        call twice."""
        if self._handle is not None:
            self._close_file()
        return [dict(f) for f in self._files]

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class TokenSplit:
    """One split of a shards folder, as a training data loader needs it."""

    shards: list[np.memmap]  # read-only memmaps, one per file, in document order
    num_tokens: int  # total ids over all shards


def open_split(folder: Path, split: str) -> TokenSplit:
    """Memory-map the shards of `split` listed in `folder`'s manifest, checking each file's size against
    it."""
    folder = Path(folder)
    if not is_finished(folder):
        raise ConfigError(
            f"no finished token shards in {folder} (no {MANIFEST}): run `{ENCODE_HINT} {folder}` first"
        )
    manifest = read_json(folder / MANIFEST)
    splits = manifest["splits"]
    if split not in splits:
        raise ConfigError(
            f"token shards in {folder} have no {split!r} split (only {', '.join(splits)}): pass one of those"
        )
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for entry in splits[split]["files"]:
        path = folder / entry["file"]
        size = entry["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != size:
            raise ConfigError(
                f"shard {path} is missing or not the {size} bytes its manifest says: "
                f"rerun `{ENCODE_HINT} {folder}`"
            )
        verify_digest(path, entry.get("sha256"), folder / MANIFEST, f"rerun `{ENCODE_HINT} {folder}`")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return TokenSplit(shards=shards, num_tokens=sum(len(s) for s in shards))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show one split of a token-shards folder.")
    parser.add_argument("folder", type=Path, help="folder written by `python -m llmcore.tokenizer encode`")
    parser.add_argument("--split", default="train", help="split to show (train or validation)")
    parser.add_argument("--head", type=int, default=16, help="print this many leading ids")
    args = parser.parse_args(argv)
    try:
        data = open_split(args.folder, args.split)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    head = data.shards[0][: args.head].tolist() if data.shards else []
    print(f"{args.split}: {data.num_tokens} tokens in {len(data.shards)} files, first ids {head}")


if __name__ == "__main__":
    main()
