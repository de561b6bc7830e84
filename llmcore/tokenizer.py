"""Stage 2: train a sentencepiece tokenizer on a corpus, and encode the corpus into token shards.

The tokenizer is lossless: byte fallback means no text is ever unknown, and with identity normalization
`decode(encode(text)) == text` for any text, whitespace and newlines included. Pieces may span words and
newlines ("\\n▁▁▁▁def▁"), which is what makes code compress well. Four control symbols (end of text, user,
assistant, end of turn) have fixed ids and are never produced from raw text, so user text cannot inject
them. This module does not clean or split the corpus (`llmcore.corpus` does), define the shard file format
(`llmcore.shards`) or format chat turns (the fine-tuning code does, with these ids).

Encoding streams and splits: `plan_encoding` cuts each split's JSONL file at line boundaries into parts,
`encode_part` encodes one part into a flat file of ids (memory bounded by a batch of documents, not the
part), and `encode_corpus` cuts the parts, in order, into shards. The shards are the same bytes however
many parts there are and wherever they ran (local processes here, Prefect tasks on a Ray cluster in
`flows.stages`), because a document's ids do not depend on its neighbours.
"""

import argparse
import io
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llmcore.artifacts import (
    MANIFEST,
    atomic_output_dir,
    atomic_write_json,
    file_digest,
    is_finished,
    read_json,
    verify_digest,
)
from llmcore.cli import add_config_flags
from llmcore.corpus import SPLITS, corpus_digest, read_documents
from llmcore.errors import ConfigError, require_choice, require_non_negative, require_positive
from llmcore.shards import ShardWriter, token_dtype

EOT, USER, ASSISTANT, END = "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"
CONTROL_SYMBOLS = (EOT, USER, ASSISTANT, END)
MODEL_FILE = "tokenizer.model"
MIN_VOCAB_SIZE = 256 + 1 + len(CONTROL_SYMBOLS)  # byte pieces, <unk>, control symbols
VOCAB_MULTIPLE = 64  # a vocabulary fitted to the corpus is rounded down to this: embedding-friendly sizes
_TOO_HIGH = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")
# Training "sentences" are chunks of whole lines up to this many UTF-8 bytes: sentencepiece silently drops
# longer ones (max_sentence_length), and pieces cannot span two sentences.
CHUNK_BYTES = 4096
SAMPLE_SEED = 0  # which chunks a corpus larger than max_training_sentences trains the tokenizer on
ENCODE_CHARS = 1 << 16  # longest piece of a document encoded at once (see _DocumentEncoder)
_SPACE = "\u2581"  # "▁", sentencepiece's stand-in for a space
log = logging.getLogger(__name__)

# Fixed choices, each measured on the Python stdlib (10 MB train, 1.9 MB held out, BPE 4096).
_TRAINER_OPTIONS = dict(
    byte_fallback=True,  # characters outside the vocabulary become UTF-8 byte pieces, never <unk>
    normalization_rule_name="identity",  # no NFKC: decode must give back the exact input
    remove_extra_whitespaces=False,  # keep runs of spaces and leading/trailing spaces
    add_dummy_prefix=False,  # do not invent a space before every text
    allow_whitespace_only_pieces=True,  # a run of indentation can be one piece
    split_by_whitespace=False,  # pieces may cross spaces and newlines: 3.76 -> 4.20 bytes/token
    treat_whitespace_as_suffix=True,  # "\n▁▁▁▁" and "def▁" become pieces; as a prefix "▁" cannot end one
    split_by_unicode_script=False,  # "self." mixes Latin and Common script; splitting them costs 7%
    split_digits=True,  # numbers as digit sequences, as LLaMA does; costs 3% bytes/token on code
    max_sentence_length=CHUNK_BYTES,
    shuffle_input_sentence=True,  # as the presets were measured with (the tokenizers differ without it)
    unk_id=0,
    bos_id=-1,  # documents are delimited by our own EOT control symbol instead
    eos_id=-1,
    pad_id=-1,
    control_symbols=list(CONTROL_SYMBOLS),  # ids 1..4, in this order
    minloglevel=1,  # warnings only; sentencepiece logs every training step at INFO
)


@dataclass(frozen=True)
class TokenizerConfig:
    """What to train; the rest of the sentencepiece setup is fixed in `_TRAINER_OPTIONS`."""

    vocab_size: int = 4096  # pieces in total, including 256 byte pieces, <unk> and the 4 control symbols
    model_type: str = "bpe"  # "bpe" (seconds on 10 MB) or "unigram" (minutes on 10 MB, 5x faster to encode)
    max_training_sentences: int = 20_000  # chunks of up to CHUNK_BYTES trained on, sampled by SAMPLE_SEED
    # from a corpus of more: at most ~80 MB of text, the same budget as 2M lines of code
    num_threads: int = 0  # training threads; 0 = all cores (os.cpu_count())
    fit_vocab_to_corpus: bool = False  # a corpus too small for vocab_size trains the largest multiple of
    # VOCAB_MULTIPLE it can fill (logged; the manifest's vocab_size says which) instead of failing

    def __post_init__(self) -> None:
        require_positive("vocab_size", self.vocab_size)
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size {self.vocab_size} does not fit the byte fallback (256 byte tokens + "
                f"{MIN_VOCAB_SIZE - 256} specials): pass --vocab-size >= {MIN_VOCAB_SIZE}"
            )
        require_choice("model_type", self.model_type, ("bpe", "unigram"))
        require_positive("max_training_sentences", self.max_training_sentences)
        require_non_negative("num_threads", self.num_threads)


def _threads(num_threads: int) -> int:
    return num_threads or os.cpu_count() or 1


class Tokenizer:
    """A trained sentencepiece model: exact round-trip encode/decode and the control-symbol ids."""

    def __init__(self, processor: spm.SentencePieceProcessor, num_threads: int = 0) -> None:
        self._sp = processor
        self.vocab_size: int = processor.get_piece_size()
        ids = [processor.piece_to_id(symbol) for symbol in CONTROL_SYMBOLS]
        if not all(processor.is_control(i) for i in ids):
            raise ConfigError(
                "tokenizer model lacks the control symbols of llmcore.tokenizer: "
                "retrain it with `python -m llmcore.tokenizer train`"
            )
        self.eot_id, self.user_id, self.assistant_id, self.end_id = ids
        self._space_bytes = [processor.piece_to_id(f"<0x{b:02X}>") for b in _SPACE.encode()]
        self._threads = _threads(num_threads)

    @classmethod
    def load(cls, path: Path, num_threads: int = 0) -> "Tokenizer":
        """Load from the `.model` file or the folder holding `tokenizer.model`; `num_threads` encode a batch
        (0 = all cores).

        When a tokenizer manifest sits beside the file, the file must match the digest it recorded; a file
        that changed since, or that sentencepiece cannot parse, is a ConfigError naming it.
        """
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        retrain = f"retrain it with `python -m llmcore.tokenizer train --corpus DIR --out {model.parent}`"
        if not model.is_file():
            raise ConfigError(
                f"no tokenizer model at {model}: "
                f"run `python -m llmcore.tokenizer train --corpus DIR --out DIR` first"
            )
        if (manifest := model.with_name(MANIFEST)).is_file():
            verify_digest(model, read_json(manifest).get("tokenizer_digest"), manifest, retrain)
        try:
            processor = spm.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as error:
            raise ConfigError(
                f"{model} is not a sentencepiece model ({str(error).splitlines()[0][:80]}): {retrain}"
            ) from None
        return cls(processor, num_threads)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel over all cores."""
        # sentencepiece writes a space as "▁" and decodes every "▁" back to a space, so a literal "▁" would
        # come back as " ": encode the text around it and emit its three UTF-8 byte pieces in between.
        parts = [text.split(_SPACE) for text in texts]
        flat = self._sp.encode([p for ps in parts for p in ps], out_type=int, num_threads=self._threads)
        out, k = [], 0
        for ps in parts:
            ids = flat[k]
            for j in range(1, len(ps)):
                ids += self._space_bytes + flat[k + j]
            out.append(ids)
            k += len(ps)
        return out

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; control ids decode to ""."""
        return self._sp.decode(ids)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: 1 for byte pieces, 0 for control symbols and <unk>."""
        sp = self._sp
        return np.array(
            [
                1
                if sp.is_byte(i)
                else 0
                if sp.is_control(i) or sp.is_unknown(i)
                else len(sp.id_to_piece(i).replace(_SPACE, " ").encode())
                for i in range(self.vocab_size)
            ],
            dtype=np.int64,
        )


def _texts(corpus_dir: Path, split: str) -> Iterator[str]:
    return (document["text"] for document in read_documents(corpus_dir, split))


def _batches(texts: Iterable[str], max_chars: int = 1 << 22) -> Iterator[list[str]]:
    """Group documents into batches of about `max_chars` characters, enough work to spread over cores."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def document_pieces(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, is last) for the pieces of at most ENCODE_CHARS characters that a document is encoded in, each
    cut after a newline (a longer line anywhere); they join back into the document."""
    start = 0
    while True:
        end = len(text)
        if end - start > ENCODE_CHARS:
            end = text.rfind("\n", start, start + ENCODE_CHARS) + 1 or start + ENCODE_CHARS
        yield text[start:end], end == len(text)
        if end == len(text):
            return
        start = end


class _DocumentEncoder:
    """Token ids of documents, each followed by end-of-text, as arrays of about `max_chars` characters' worth.

    A long document is encoded in pieces of at most ENCODE_CHARS characters cut after a newline (a longer
    line anywhere), so memory stays a small multiple of the text rather than ~45x it (Python ints for the
    whole document); decoding the concatenated ids still gives the document exactly.
    """

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, max_chars: int = 1 << 19) -> None:
        self.tokenizer, self.dtype, self.max_chars = tokenizer, dtype, max_chars
        self.pieces: list[str] = []
        self.ends: list[bool] = []  # the piece ends a document: end-of-text follows it
        self.size = 0

    def add(self, text: str) -> Iterator[np.ndarray]:
        for piece, last in document_pieces(text):
            self.pieces.append(piece)
            self.ends.append(last)
            self.size += len(piece)
            if self.size >= self.max_chars:
                yield from self.flush()

    def flush(self) -> Iterator[np.ndarray]:
        if self.pieces:
            eot = np.array([self.tokenizer.eot_id], dtype=self.dtype)
            ids = self.tokenizer.encode_batch(self.pieces)
            parts = [
                part
                for piece, end in zip(ids, self.ends, strict=True)
                for part in (
                    (np.array(piece, dtype=self.dtype), eot) if end else (np.array(piece, dtype=self.dtype),)
                )
            ]
            del ids
            self.pieces, self.ends, self.size = [], [], 0
            yield np.concatenate(parts)


def _training_chunks(text: str) -> Iterator[str]:
    """Cut a document into chunks of whole lines of at most CHUNK_BYTES bytes, each cut before a newline.

    The sentence iterator strips trailing newlines, so cutting before "\\n" keeps every newline, and keeps it
    next to the indentation that follows it. A single line longer than a chunk is cut anywhere.
    """
    chunk: list[str] = []
    size = 0
    for i, line in enumerate(text.split("\n")):
        line = "\n" + line if i else line
        n = len(line.encode())
        if chunk and size + n > CHUNK_BYTES:
            yield "".join(chunk)
            chunk, size = [], 0
        if n > CHUNK_BYTES:
            step = CHUNK_BYTES // 4  # characters; a UTF-8 character takes at most 4 bytes
            yield from (line[j : j + step] for j in range(0, len(line), step))
        else:
            chunk.append(line)
            size += n
    if chunk:
        yield "".join(chunk)


def _train_bytes_at_least(corpus_dir: Path, limit: int) -> int:
    """Bytes of training text, counted only up to `limit` so that a big corpus costs nothing to check."""
    total = 0
    for text in _texts(corpus_dir, "train"):
        total += len(text.encode())
        if total >= limit:
            break
    return total


def _explain(error: RuntimeError, config: TokenizerConfig, train_bytes: int) -> ConfigError | None:
    """Translate sentencepiece's vocabulary-size failures into one-line ConfigErrors; None for others."""
    message = str(error)
    if m := _TOO_HIGH.search(message):
        return ConfigError(
            f"corpus has {train_bytes} bytes of training text, too small for vocab_size {config.vocab_size}: "
            f"pass a larger corpus or --vocab-size <= {m[1]}"
        )
    if m := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message):
        return ConfigError(
            f"vocab_size {config.vocab_size} cannot hold the byte fallback, specials and the corpus's "
            f"{int(m[1]) - MIN_VOCAB_SIZE} common characters: pass --vocab-size >= {m[1]}"
        )
    return None


def _bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float | None:
    n_bytes = n_tokens = 0
    for batch in _batches(texts):
        n_bytes += sum(len(t.encode()) for t in batch)
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
    return round(n_bytes / n_tokens, 4) if n_tokens else None


def train_tokenizer(corpus_dir: Path, out_dir: Path, config: TokenizerConfig) -> dict:
    """Train on the corpus's train split; write `out_dir/tokenizer.model` and `manifest.json` atomically.

    Args:
        corpus_dir: a finished corpus folder (train.jsonl, validation.jsonl, manifest.json).
        out_dir: the tokenizer folder to create or replace.
        config: vocabulary size, model type, sampling and threads.

    Returns the manifest: config, vocab_size (below config.vocab_size only when fitted to the corpus),
    control ids, train_seconds, bytes_per_token on the validation split, corpus and tokenizer digests,
    sentencepiece version.
    """
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    source_digest = corpus_digest(corpus_dir)
    # A corpus smaller than the vocabulary cannot fill it; say so before sentencepiece starts.
    needed = MIN_VOCAB_SIZE if config.fit_vocab_to_corpus else config.vocab_size
    if (seen := _train_bytes_at_least(corpus_dir, needed)) < needed:
        raise ConfigError(
            f"corpus {corpus_dir} has {seen} bytes of training text, "
            f"fewer than vocab_size {needed}: "
            f"pass a larger corpus or a smaller --vocab-size"
        )

    # A corpus of more chunks than the budget is sampled here, by seed: sentencepiece's own sampling gives
    # another tokenizer in every process, even after spm.set_random_generator_seed (measured, 0.2.3).
    chunks = sum(1 for text in _texts(corpus_dir, "train") for _ in _training_chunks(text))
    budget = config.max_training_sentences
    kept = set(random.Random(SAMPLE_SEED).sample(range(chunks), budget)) if chunks > budget else None

    def sentences() -> Iterator[str]:
        index = 0
        for text in _texts(corpus_dir, "train"):
            seen_by_trainer["bytes"] += len(text.encode())
            seen_by_trainer["documents"] += 1
            for chunk in _training_chunks(text):
                if kept is None or index in kept:
                    yield chunk
                index += 1

    vocab_size = config.vocab_size
    start = time.perf_counter()
    while True:
        model, seen_by_trainer = io.BytesIO(), {"bytes": 0, "documents": 0}
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=config.model_type,
                input_sentence_size=config.max_training_sentences,
                num_threads=_threads(config.num_threads),
                **_TRAINER_OPTIONS,
            )
            break
        except RuntimeError as e:
            # sentencepiece knows the most pieces a corpus gives only once it has tried: then train again
            most = int(m[1]) if (m := _TOO_HIGH.search(str(e))) else 0
            fitted = most // VOCAB_MULTIPLE * VOCAB_MULTIPLE
            if config.fit_vocab_to_corpus and MIN_VOCAB_SIZE <= fitted < vocab_size:
                log.info(
                    "tokenizer: the corpus fills at most %d pieces, fewer than vocab_size %d: "
                    "training vocab_size %d (a multiple of %d)",
                    most,
                    vocab_size,
                    fitted,
                    VOCAB_MULTIPLE,
                )
                vocab_size = fitted
                continue
            explained = _explain(e, replace(config, vocab_size=vocab_size), seen_by_trainer["bytes"])
            if explained is None:
                raise
            raise explained from None  # the sentencepiece trace adds nothing to the one-line fix
    train_seconds = time.perf_counter() - start

    with atomic_output_dir(out_dir) as tmp:
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        tokenizer = Tokenizer.load(tmp)
        manifest = {
            "config": asdict(config),
            "vocab_size": tokenizer.vocab_size,
            "control_ids": dict(
                zip(
                    CONTROL_SYMBOLS,
                    (tokenizer.eot_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id),
                    strict=True,
                )
            ),
            "train_seconds": round(train_seconds, 3),
            "train_bytes": seen_by_trainer["bytes"],
            "train_documents": seen_by_trainer["documents"],
            "bytes_per_token": _bytes_per_token(tokenizer, _texts(corpus_dir, "validation")),  # on validation
            "corpus_digest": source_digest,
            "tokenizer_digest": file_digest(tmp / MODEL_FILE),
            "sentencepiece_version": spm.__version__,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


@dataclass(frozen=True)
class EncodePart:
    """Lines [start, end) (byte offsets) of a corpus split's JSONL file: the unit of parallel encoding."""

    split: str  # "train" or "validation"
    index: int  # position among the split's parts: their ids are concatenated in this order
    start: int
    end: int


def plan_encoding(corpus_dir: Path, parts: int = 1, max_part_bytes: int = 1 << 26) -> list[EncodePart]:
    """Cut each split of a finished corpus into max(parts, size / max_part_bytes) parts of about equal
    bytes, at line boundaries (fewer when it has fewer lines); an empty split is one empty part."""
    require_positive("parts", parts)
    require_positive("max_part_bytes", max_part_bytes)
    corpus_digest(Path(corpus_dir))  # ConfigError unless the corpus is finished
    plan = []
    for split in SPLITS:
        path = Path(corpus_dir) / f"{split}.jsonl"
        size = path.stat().st_size
        n = max(parts, -(-size // max_part_bytes))
        cuts = {0, size}
        with open(path, "rb") as f:
            for k in range(1, n):
                f.seek(k * size // n)
                f.readline()  # to the start of the next line
                cuts.add(min(f.tell(), size))
        ends = sorted(cuts)
        bounds = list(zip(ends, ends[1:], strict=False)) or [(0, 0)]
        plan += [EncodePart(split, i, start, end) for i, (start, end) in enumerate(bounds)]
    return plan


def _part_texts(corpus_dir: Path, part: EncodePart) -> Iterator[str]:
    with open(Path(corpus_dir) / f"{part.split}.jsonl", "rb") as f:
        f.seek(part.start)
        while f.tell() < part.end:
            yield json.loads(f.readline())["text"]


def encode_part(
    corpus_dir: Path, tokenizer_dir: Path, part: EncodePart, out_file: Path, num_threads: int = 0
) -> dict:
    """Encode the documents of one part, each followed by end-of-text, into `out_file` (raw ids in the
    shard dtype, replaced if there); returns {"tokens", "documents", "bytes"}."""
    tokenizer = Tokenizer.load(tokenizer_dir, num_threads)
    dtype = token_dtype(tokenizer.vocab_size)
    encoder = _DocumentEncoder(tokenizer, dtype)
    counts = {"tokens": 0, "documents": 0, "bytes": 0}
    with open(out_file, "wb") as out:

        def write(arrays: Iterable[np.ndarray]) -> None:
            for ids in arrays:
                ids.tofile(out)
                counts["tokens"] += ids.size

        for text in _part_texts(corpus_dir, part):
            counts["documents"] += 1
            counts["bytes"] += len(text.encode())
            write(encoder.add(text))
        write(encoder.flush())
    return counts


MapParts = Callable[[list[EncodePart], list[Path]], list[dict]]


def _in_processes(corpus_dir: Path, tokenizer_dir: Path, workers: int) -> MapParts:
    """A MapParts that runs `encode_part` in `workers` local processes (in this one when 1)."""

    def run(parts: list[EncodePart], files: list[Path]) -> list[dict]:
        args = ([corpus_dir] * len(parts), [tokenizer_dir] * len(parts), parts, files)
        if workers == 1:
            return list(map(encode_part, *args))
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(encode_part, *args, [1] * len(parts)))  # a thread each: workers = cores

    return run


def encode_corpus(
    corpus_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    shard_tokens: int = 2**27,
    workers: int = 1,
    map_parts: MapParts | None = None,
) -> dict:
    """Encode both corpus splits into token shards (`llmcore.shards` format) in `out_dir`, atomically.

    Every document is followed by the end-of-text id. Args: `corpus_dir` a finished corpus folder,
    `tokenizer_dir` a finished tokenizer folder, `out_dir` the shards folder to create or replace,
    `shard_tokens` the most ids per file, `workers` local processes (0 = all cores), `map_parts` what
    encodes the parts instead (`(parts, files) -> counts` in order, each part with `encode_part`: the
    Prefect flow maps a task over them). Returns the manifest: dtype, vocab_size, eot_id, and per split
    the files, tokens, documents and UTF-8 bytes; tokenizer and corpus digests.
    """
    corpus_dir, tokenizer_dir, out_dir = Path(corpus_dir), Path(tokenizer_dir), Path(out_dir)
    require_positive("shard_tokens", shard_tokens)
    require_non_negative("workers", workers)
    source_digest = corpus_digest(corpus_dir)
    if not is_finished(tokenizer_dir):
        raise ConfigError(
            f"no finished tokenizer in {tokenizer_dir}: "
            f"run `python -m llmcore.tokenizer train --corpus {corpus_dir} --out {tokenizer_dir}` first"
        )
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    workers = workers or len(os.sched_getaffinity(0))
    parts = plan_encoding(corpus_dir, workers)
    splits = {}
    start = time.perf_counter()
    with atomic_output_dir(out_dir) as tmp:
        scratch = tmp / ".parts"  # encoded parts, removed once cut into shards
        scratch.mkdir()
        files = [scratch / f"{part.split}_{part.index:06d}.bin" for part in parts]
        counts = (map_parts or _in_processes(corpus_dir, tokenizer_dir, workers))(parts, files)
        for split in SPLITS:
            mine = [
                (file, n) for part, file, n in zip(parts, files, counts, strict=True) if part.split == split
            ]
            with ShardWriter(tmp, split, dtype, shard_tokens) as writer:
                for file, n in mine:
                    if file.stat().st_size != n["tokens"] * dtype.itemsize:
                        raise ConfigError(
                            f"encoded part {file} does not hold the {n['tokens']} ids its task reported "
                            "(another process wrote there?): rerun the encoding"
                        )
                    if n["tokens"]:
                        ids = np.memmap(file, dtype=dtype, mode="r")
                        for i in range(0, ids.size, 1 << 24):  # a bounded slice in memory at a time
                            writer.write(ids[i : i + (1 << 24)])
                        del ids
                    file.unlink()
                shards = writer.close()
            splits[split] = {
                "files": shards,
                "tokens": sum(f["tokens"] for f in shards),
                "documents": sum(n["documents"] for _, n in mine),
                "bytes": sum(n["bytes"] for _, n in mine),
            }
        scratch.rmdir()
        manifest = {
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "shard_tokens": shard_tokens,
            "splits": splits,
            "encode_seconds": round(time.perf_counter() - start, 3),
            "tokenizer_digest": file_digest(tokenizer_dir / MODEL_FILE),
            "corpus_digest": source_digest,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tokenizer, or encode a corpus into token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece tokenizer on a corpus folder")
    train.add_argument(
        "--corpus", type=Path, required=True, help="corpus folder (train.jsonl, validation.jsonl)"
    )
    train.add_argument("--out", type=Path, required=True, help="tokenizer folder to write")
    add_config_flags(train, TokenizerConfig)
    encode = commands.add_parser("encode", help="encode a corpus folder into token shards")
    encode.add_argument("--corpus", type=Path, required=True, help="corpus folder")
    encode.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    encode.add_argument("--out", type=Path, required=True, help="shards folder to write")
    encode.add_argument("--shard-tokens", type=int, default=2**27, help="most token ids per shard file")
    encode.add_argument("--workers", type=int, default=0, help="local processes (0 = all cores)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            given = {field: getattr(args, field) for field in TokenizerConfig.__dataclass_fields__}
            config = TokenizerConfig(**{k: v for k, v in given.items() if v is not None})
            manifest = train_tokenizer(args.corpus, args.out, config)
        else:
            # The imported module's function, not __main__'s: worker processes look parts up by module name.
            from llmcore.tokenizer import encode_corpus as importable

            manifest = importable(args.corpus, args.tokenizer, args.out, args.shard_tokens, args.workers)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
