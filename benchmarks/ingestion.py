"""Corpus ingestion + shard encoding MB/s: the library on one core against the library on all cores.

A subprocess per repetition runs `llmcore.corpus.ingest(workers=0)` then
`llmcore.tokenizer.encode_corpus(workers=0)` (each in parts, a process per core it may use; with a tokenizer
trained once beforehand, untimed) pinned to one core, or free on all of them; the two alternate. Goal: all
cores at least 0.9 x cores as fast as one. Two more rows report ingestion and encoding alone, timed inside
the worker.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import Result, interleaved
from llmcore.environment import environ_copy

_WORKER = """
import json, os, sys, time
from pathlib import Path
from llmcore.corpus import CorpusConfig, ingest
from llmcore.tokenizer import encode_corpus
cores, source, max_bytes, tokenizer, out = sys.argv[1:6]
if cores != "all":
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:int(cores)]))
started = time.perf_counter()
limit = int(max_bytes) if max_bytes != "none" else None
manifest = ingest(CorpusConfig(source=source, max_bytes=limit), Path(out) / "corpus", workers=0)
encoding = time.perf_counter()
encode_corpus(Path(out) / "corpus", Path(tokenizer), Path(out) / "tokens", workers=0)
done = time.perf_counter()
print(json.dumps({"ingest_seconds": encoding - started, "encode_seconds": done - encoding}))
"""


@dataclass(frozen=True)
class IngestionBench:
    source: str = "stdlib"
    max_bytes: int | None = None  # corpus bytes to keep; None = all
    vocab_size: int = 4096
    repetitions: int = 3


def _worker(
    cores: str, bench: IngestionBench, tokenizer_dir: Path, scratch: Path, env: dict[str, str]
) -> dict:
    with tempfile.TemporaryDirectory(dir=scratch) as out:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _WORKER,
                cores,
                bench.source,
                str(bench.max_bytes or "none"),
                str(tokenizer_dir),
                out,
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(bench: IngestionBench) -> list[Result]:
    from llmcore.corpus import CorpusConfig, ingest
    from llmcore.tokenizer import TokenizerConfig, train_tokenizer

    cores = len(os.sched_getaffinity(0))
    env = {
        **environ_copy(),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        manifest = ingest(CorpusConfig(source=bench.source, max_bytes=bench.max_bytes), scratch / "corpus")
        train_tokenizer(
            scratch / "corpus", scratch / "tokenizer", TokenizerConfig(vocab_size=bench.vocab_size)
        )
        size = sum(manifest["bytes"].values())
        timed: dict[str, list[dict]] = {"one": [], "all": []}

        def side(name: str) -> None:
            timed[name].append(
                _worker("1" if name == "one" else "all", bench, scratch / "tokenizer", scratch, env)
            )

        seconds = interleaved(
            {"one": lambda: side("one"), "all": lambda: side("all")}, bench.repetitions, warmup=0
        )
    mb = size / 1e6
    return [
        Result(
            f"ingest + encode, all {cores} cores vs one",
            "MB/s",
            mb / seconds["all"],
            mb / seconds["one"],
            0.9 * cores,
            f"{bench.source}, {mb:.1f} MB of text, vocab {bench.vocab_size}, subprocess per run "
            f"(interpreter start included); median of {bench.repetitions}",
        ),
        *(
            Result(
                f"{stage} alone, all {cores} cores vs one",
                "MB/s",
                mb / statistics.median(t[f"{stage}_seconds"] for t in timed["all"]),
                mb / statistics.median(t[f"{stage}_seconds"] for t in timed["one"]),
                0.9 * cores,
                f"{what}; timed in the worker; median of {bench.repetitions}",
            )
            for stage, what in (
                ("ingest", "ingest(workers=0): parts of the file list scanned, then written, a process each"),
                (
                    "encode",
                    "encode_corpus(workers=0): parts of each split in a process per core, "
                    "sentencepiece on one thread each",
                ),
            )
        ),
    ]
