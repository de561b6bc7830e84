"""Prompt/response pairs for instruction fine-tuning, written as train/validation JSONL.

By default the pairs come from the ingested corpus itself, so fine-tuning needs no download: every
documented Python function gives (its docstring -> its code without the docstring), a "write the function
this docstring describes" task. Pairs from a training document go to train and pairs from a validation
document to validation, so documents held out of pretraining stay held out. User data (a .jsonl/.csv/
.parquet file, or hf:NAME with a configuration, split and revision, holding prompt and response columns) is
split by a hash of each prompt. Either way a prompt never lands on both sides: a prompt trained on with one
response is not held out with another (docstring pairs whose prompt is also a train prompt leave
validation). The output folder (`train.jsonl`, `validation.jsonl`, `manifest.json`) is written atomically.

It does not apply a chat template or tokenize; the fine-tuning stage does that.
"""

import argparse
import ast
import io
import json
import platform
import textwrap
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from llmcore.artifacts import (
    MANIFEST,
    atomic_output_dir,
    atomic_write_json,
    file_digest,
    is_finished,
    json_digest,
    read_json,
)
from llmcore.corpus import (
    SPLITS,
    TABLE_SUFFIXES,
    UnreadableFileError,
    is_validation,
    load_hf_table,
    read_documents,
    read_table,
    table_columns,
)
from llmcore.errors import ConfigError, require_choice, require_fraction, require_positive

SOURCE_HINT = f"pass --source docstrings, hf:NAME or a {'/'.join(TABLE_SUFFIXES)} file"


@dataclass(frozen=True)
class SFTDataConfig:
    source: str = (
        "docstrings"  # "docstrings" (from the ingested corpus) | a .jsonl/.csv/.parquet file | "hf:NAME"
    )
    prompt_column: str = "prompt"  # column holding the prompt in user data
    response_column: str = "response"  # column holding the response in user data
    validation_fraction: float = 0.05  # for user data only; docstring pairs follow the corpus split
    max_response_chars: int = 2000  # longer responses dropped (they would not fit a small context)
    hf_config: str | None = None  # configuration of an hf: source
    hf_split: str = "train"  # split of an hf: source
    hf_revision: str | None = None  # hub revision of an hf: source to pin (commit sha, tag, branch)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"sft data source is empty: {SOURCE_HINT}")
        if self.kind == "file" and Path(self.source).suffix.lower() not in TABLE_SUFFIXES:
            raise ConfigError(f"sft data source {self.source!r} is not a supported file: {SOURCE_HINT}")
        if self.kind == "hf" and not self.source[3:].strip():
            raise ConfigError("sft data source 'hf:' names no dataset: pass --source hf:NAME")
        if not self.prompt_column or not self.response_column or self.prompt_column == self.response_column:
            raise ConfigError(
                "prompt_column and response_column must be two different, non-empty names: "
                "pass --prompt-column and --response-column"
            )
        if self.kind != "hf" and (self.hf_config, self.hf_split, self.hf_revision) != (None, "train", None):
            raise ConfigError(
                f"sft data source {self.source!r} is not hf:NAME, so it has no configuration, split or "
                "revision: pass hf:NAME, or drop --hf-config, --hf-split and --hf-revision (in the "
                "pipeline --sft-hf-config, --sft-hf-split and --sft-hf-revision)"
            )
        if not self.hf_split:
            raise ConfigError(
                "hf_split is empty: pass --hf-split (in the pipeline --sft-hf-split) with a split name "
                "such as train"
            )
        if self.hf_revision is not None and not self.hf_revision.strip():
            raise ConfigError(
                "hf_revision is empty: pass --hf-revision (in the pipeline --sft-hf-revision) with a "
                "commit sha, tag or branch, or omit it"
            )
        require_fraction("validation_fraction", self.validation_fraction)
        require_positive("max_response_chars", self.max_response_chars)
        if not isinstance(self.max_response_chars, int):
            got = self.max_response_chars
            raise ConfigError(
                f"max_response_chars must be a whole number, got {got!r}: pass --max-response-chars N"
            )

    @property
    def kind(self) -> str:
        """ "docstrings", "hf" or "file"."""
        if self.source == "docstrings":
            return "docstrings"
        return "hf" if self.source.startswith("hf:") else "file"


def docstring_pairs(source_text: str) -> list[tuple[str, str]]:
    """(docstring, code) for every documented function and method in `source_text`, in source order.

    The docstring is cleaned with `inspect.cleandoc`; the code is the function's source lines (decorators,
    comments and formatting kept) without the docstring's lines, dedented. Functions whose body is only a
    docstring, or whose docstring shares a line with other code, give no pair. Raises SyntaxError (or
    ValueError) when `source_text` is not valid Python.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old code's invalid escape sequences warn while parsing
        tree = ast.parse(source_text)
    # Split lines as the parser counts them: on \n, \r\n and \r only (str.splitlines also splits on \f).
    lines = io.StringIO(source_text, newline="").readlines()
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    pairs = []
    for node in sorted(functions, key=lambda n: n.lineno):
        docstring = ast.get_docstring(node)  # cleaned with inspect.cleandoc
        if docstring is None or len(node.body) < 2:
            continue
        doc = node.body[0]
        # Offsets are in UTF-8 bytes. Only a docstring on lines of its own can be cut out by lines.
        before = lines[doc.lineno - 1].encode()[: doc.col_offset]
        after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :].strip()
        if before.strip() or (after and not after.startswith(b"#")):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        resume = doc.end_lineno  # the blank lines that set the docstring off from the body go with it
        while not lines[resume].strip():
            resume += 1
        code = lines[start : doc.lineno - 1] + lines[resume : node.end_lineno]
        pairs.append((docstring, textwrap.dedent("".join(code)).rstrip()))
    return pairs


def _corpus_candidates(corpus_dir: Path | None) -> tuple[list[tuple[str, str, str]], dict, dict]:
    """(split, prompt, response) from the Python documents of a corpus, train first; counts; input digests."""
    if corpus_dir is None or not is_finished(corpus_dir):
        raise ConfigError(
            f"{corpus_dir} is not a finished corpus (no {MANIFEST}): "
            f"pass --corpus DIR from python -m llmcore.corpus"
        )
    candidates, parsed, failed = [], 0, 0
    for split in SPLITS:
        for document in read_documents(corpus_dir, split):
            if not document["source"].endswith(".py"):
                continue
            try:
                pairs = docstring_pairs(document["text"])
            except (
                SyntaxError,
                ValueError,
                RecursionError,
            ):  # not Python 3, NUL bytes, nesting too deep to parse
                failed += 1
                continue
            parsed += 1
            candidates += [(split, prompt, response) for prompt, response in pairs]
    corpus_digest = read_json(Path(corpus_dir) / MANIFEST)["content_digest"]
    inputs = {"corpus": str(corpus_dir), "corpus_content_digest": corpus_digest}
    return candidates, {"documents_parsed": parsed, "documents_failed": failed}, inputs


def _user_candidates(config: SFTDataConfig) -> tuple[list[tuple[str, str, str]], dict, dict]:
    """(split, prompt, response) from a user file or HF dataset, split by the prompt's hash (so that one
    prompt with two responses stays on one side); counts; input digests."""
    columns = {"prompt_column": config.prompt_column, "response_column": config.response_column}
    if config.kind == "hf":
        name = config.source[3:]
        table = load_hf_table(name, config.hf_config, config.hf_split, config.hf_revision)
        rows = table_columns(table, columns, f"hf dataset {name}")
        inputs = {
            "hf": name,
            "hf_config": config.hf_config,
            "hf_split": config.hf_split,
            "hf_revision": config.hf_revision,
        }
    else:
        path = Path(config.source)
        if not path.is_file():
            raise ConfigError(f"sft data file {path} does not exist: {SOURCE_HINT}")
        try:
            frame = read_table(path)
        except UnreadableFileError as e:
            raise ConfigError(
                f"sft data file {path} is unreadable ({e}): pass a UTF-8 or parquet file"
            ) from e
        rows = table_columns(frame, columns, f"sft data file {path}")
        inputs = {"file": str(path), "file_digest": file_digest(path)}
    fraction = config.validation_fraction
    candidates = [
        ("validation" if is_validation(json_digest(p), fraction) else "train", p, r) for p, r in rows
    ]
    return candidates, {"rows_read": len(rows)}, inputs


def build_sft_data(config: SFTDataConfig, corpus_dir: Path | None, out_dir: Path) -> dict:
    """Build the pairs into `out_dir` and return the manifest. `corpus_dir` (a corpus.ingest folder) is read
    only for the docstrings source. ConfigError, with nothing written, when a split would be empty."""
    if config.kind == "docstrings":
        candidates, counts, inputs = _corpus_candidates(corpus_dir)
    else:
        candidates, counts, inputs = _user_candidates(config)

    kept = {split: {} for split in SPLITS}  # split -> pair id -> pair
    seen: set[str] = set()
    empty = too_long = duplicates = prompt_in_train = 0
    # A prompt trained on with one response and held out with another would score the model on what it
    # was shown: validation keeps only prompts that train has not. Candidates come train first, so a pair
    # found in both splits stays in train.
    train_prompts = {prompt for split, prompt, _ in candidates if split == "train"}
    for split, prompt, response in candidates:
        if not prompt.strip() or not response.strip():
            empty += 1
        elif len(response) > config.max_response_chars:
            too_long += 1
        elif (pair_id := json_digest([prompt, response])) in seen:
            duplicates += 1
        elif split == "validation" and prompt in train_prompts:
            prompt_in_train += 1
        else:
            seen.add(pair_id)
            kept[split][pair_id] = {"prompt": prompt, "response": response}
    if not kept["train"] or not kept["validation"]:
        fix = (
            "ingest a corpus with more Python files or a larger --validation-fraction"
            if config.kind == "docstrings"
            else "add pairs or change --validation-fraction"
        )
        train, validation = len(kept["train"]), len(kept["validation"])
        raise ConfigError(f"{config.source} gives {train} train and {validation} validation pairs: {fix}")

    ids = {split: sorted(pairs) for split, pairs in kept.items()}
    with atomic_output_dir(out_dir) as tmp:
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for pair_id in ids[split]:
                    f.write(json.dumps(kept[split][pair_id], ensure_ascii=False) + "\n")
        manifest = {
            "kind": config.kind,
            "source": config.source,
            "config": asdict(config),
            "inputs": inputs,
            "counts": {
                **counts,
                "candidates": len(candidates),
                "train_pairs": len(ids["train"]),
                "validation_pairs": len(ids["validation"]),
                "duplicates_dropped": duplicates,
                "empty_dropped": empty,
                "too_long_dropped": too_long,
                "prompt_in_train_dropped": prompt_in_train,
            },
            "content_digest": json_digest(ids),
            "versions": {"python": platform.python_version()},
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def read_pairs(sft_dir: Path, split: str) -> list[dict]:
    """The {"prompt", "response"} pairs of one split of a finished folder written by build_sft_data."""
    require_choice("split", split, SPLITS)
    if not is_finished(sft_dir):
        raise ConfigError(
            f"{sft_dir} is not finished SFT data (no {MANIFEST}): run python -m llmcore.sft_data first"
        )
    with open(Path(sft_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None) -> None:
    defaults = SFTDataConfig()
    parser = argparse.ArgumentParser(
        prog="python -m llmcore.sft_data", description="Build fine-tuning pairs."
    )
    parser.add_argument(
        "--corpus", type=Path, help="folder from python -m llmcore.corpus (for --source docstrings)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    parser.add_argument(
        "--source", default=defaults.source, help="docstrings, hf:NAME or a .jsonl/.csv/.parquet file"
    )
    parser.add_argument("--prompt-column", default=defaults.prompt_column)
    parser.add_argument("--response-column", default=defaults.response_column)
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--max-response-chars", type=int, default=defaults.max_response_chars)
    parser.add_argument("--hf-config", help="configuration of an hf: source")
    parser.add_argument("--hf-split", default=defaults.hf_split, help="split of an hf: source")
    parser.add_argument("--hf-revision", help="pinned hub revision of an hf: source")
    args = parser.parse_args(argv)
    try:
        config = SFTDataConfig(**{name: getattr(args, name) for name in SFTDataConfig.__dataclass_fields__})
        manifest = build_sft_data(config, args.corpus, args.out)
    except ConfigError as e:
        parser.error(str(e))
    print(json.dumps(manifest["counts"], indent=2))


if __name__ == "__main__":
    main()
