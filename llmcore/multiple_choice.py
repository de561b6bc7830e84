"""Multiple-choice (cloze) evaluation: which continuation of a context does the model find most likely?

An item is `{"context": str, "choices": [str, ...], "answer": int}`; the text scored for a choice is
context + choice, concatenated as given and encoded as one text (as in training, where pieces may cross
spaces and line breaks). Every choice is scored by its log-likelihood under the model divided by its
length in UTF-8 bytes (HellaSwag's length-normalized accuracy, counted in bytes as
lm-evaluation-harness's `acc_bytes` does, so the figure does not depend on the tokenizer); the highest
scoring choice is the model's answer. All (item, choice) rows are scored in padded batches.

The default task needs no hand-made data and works on any text corpus: from the held-out (validation)
documents, given up to `CONTEXT_LINES` preceding lines, pick the true next line among four lines of the
same document (seeded, so the same corpus gives the same items). A user set is a jsonl file in the
format above (`--cloze-data FILE`). This module does not train, log or read token shards.

    python -m llmcore.multiple_choice --model DIR/model.pt --tokenizer DIR (--corpus DIR | --cloze-data FILE)
"""

import argparse
import itertools
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from llmcore.chat import IGNORE
from llmcore.checkpoint import load_model
from llmcore.corpus import read_documents
from llmcore.device import resolve_device
from llmcore.errors import ConfigError, require_positive
from llmcore.tokenizer import Tokenizer

NUM_CHOICES = 4  # the default task's choices per item: chance is 1/4
CONTEXT_LINES = 8  # preceding lines given as context, at most
MAX_LINE_BYTES = 200  # longer lines are neither answers nor distractors (tables, minified data)
MAX_CONTEXT_CHARS = 1000  # a context keeps its last this many characters


def default_items(
    corpus_dir: Path, num_items: int, seed: int = 0, max_line_bytes: int = MAX_LINE_BYTES
) -> list[dict]:
    """Up to `num_items` next-line items from the corpus's validation documents, spread over them.

    An answer is a non-blank line that is not a document's first; its three distractors are other
    non-blank lines of the same document whose stripped text differs from it and from each other. Lines
    longer than `max_line_bytes` are left out (below a model's context, every choice fits it: a token
    stands for at least one byte).
    """
    require_positive("cloze_items", num_items)

    def usable(line: str) -> bool:
        return bool(line.strip()) and len(line.encode("utf-8")) <= max_line_bytes

    eligible = []
    for document in read_documents(corpus_dir, "validation"):
        lines = document["text"].splitlines()
        distinct = {line.strip(): line for line in lines if usable(line)}
        if len(distinct) >= NUM_CHOICES:
            eligible.append((lines, list(distinct.values())))
    if not eligible:
        raise ConfigError(
            f"no held-out document in {corpus_dir} has {NUM_CHOICES} distinct lines to build cloze items "
            "from: pass --cloze-data FILE (jsonl of context, choices, answer) or a larger corpus"
        )
    rng = random.Random(seed)
    per_document = math.ceil(num_items / len(eligible))
    items = []
    for lines, distinct in eligible:
        answers = [i for i in range(1, len(lines)) if usable(lines[i])]
        for i in sorted(rng.sample(answers, min(per_document, len(answers)))):
            others = [line for line in distinct if line.strip() != lines[i].strip()]
            choices = [lines[i], *rng.sample(others, NUM_CHOICES - 1)]
            rng.shuffle(choices)
            context = "\n".join(lines[max(0, i - CONTEXT_LINES) : i]) + "\n"
            items.append(
                {
                    "context": context[-MAX_CONTEXT_CHARS:],
                    "choices": choices,
                    "answer": choices.index(lines[i]),
                }
            )
            if len(items) == num_items:
                return items
    return items


def read_items(path: Path) -> list[dict]:
    """The items of a jsonl file, every one checked: a context string, a list of at least two non-empty
    choice strings (the same number in every item), and an answer index within them."""
    path = Path(path)
    fix = f'fix {path}: one JSON object per line, {{"context": str, "choices": [str, ...], "answer": int}}'
    if not path.is_file():
        raise ConfigError(f"cloze data {path} does not exist: pass --cloze-data with a jsonl file")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path} line {number} is not JSON ({error.msg}): {fix}") from None
            choices = item.get("choices") if isinstance(item, dict) else None
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("context"), str)
                or not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise ConfigError(
                    f"{path} line {number} lacks a context string or two or more non-empty choices: {fix}"
                )
            answer = item.get("answer")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ConfigError(
                    f"{path} line {number}: answer {answer!r} is not an index of its {len(choices)} "
                    f"choices (0..{len(choices) - 1}): {fix}"
                )
            if items and len(choices) != len(items[0]["choices"]):
                raise ConfigError(
                    f"{path} line {number} has {len(choices)} choices but earlier items have "
                    f"{len(items[0]['choices'])}: give every item the same number of choices"
                )
            items.append({"context": item["context"], "choices": choices, "answer": answer})
    if not items:
        raise ConfigError(f"cloze data {path} is an empty evaluation set (no items): {fix}")
    return items


def _rows(tokenizer: Tokenizer, items: Sequence[dict], block_size: int) -> list[tuple[list[int], int, int]]:
    """(token ids, scored continuation tokens, choice bytes) per (item, choice), in order.

    Context and choice are encoded together, as running text is; the scored tokens are those after the
    longest prefix shared with the context's own encoding (a piece across the boundary is scored with
    the choice)."""
    rows = []
    for number, item in enumerate(items):
        context_ids = tokenizer.encode(item["context"])
        for choice in item["choices"]:
            ids = tokenizer.encode(item["context"] + choice)
            start = next(
                (i for i, (a, b) in enumerate(zip(context_ids, ids, strict=False)) if a != b),
                min(len(context_ids), len(ids)),
            )
            if start == 0:  # nothing before the choice: predict it from the start of a document
                ids, start = [tokenizer.eot_id, *ids], 1
            if len(ids) - start > block_size:
                raise ConfigError(
                    f"cloze item {number} has a choice of {len(ids) - start} tokens, longer than the model's "
                    f"context of {block_size}: shorten its choices or drop the item"
                )
            rows.append((ids[-(block_size + 1) :], len(ids) - start, len(choice.encode("utf-8"))))
    return rows


@torch.no_grad()
def choice_scores(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    items: Sequence[dict],
    device: torch.device,
    batch_size: int = 8,
) -> list[list[float]]:
    """Per item, per choice: the choice's log-likelihood (nats) given the context, per UTF-8 byte."""
    was_training = model.training
    model.eval()
    rows = _rows(tokenizer, items, model.config.block_size)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths batch together
    scores = [0.0] * len(rows)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        width = max(len(rows[i][0]) for i in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), IGNORE, dtype=torch.long)  # only the continuation is scored
        for row, i in enumerate(chunk):
            ids, scored, _ = rows[i]
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, len(ids) - 1 - scored : len(ids) - 1] = torch.tensor(ids[-scored:])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, losses = model(x.to(device), y.to(device), reduction="none")  # (B, T), 0 where ignored
        for i, loss in zip(chunk, losses.float().sum(dim=1).tolist(), strict=True):
            scores[i] = -loss / rows[i][2]
    model.train(was_training)
    ends = list(itertools.accumulate(len(item["choices"]) for item in items))
    return [scores[end - len(item["choices"]) : end] for item, end in zip(items, ends, strict=True)]


def accuracy(items: Sequence[dict], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Share of items whose best-scoring choice (the first, on a tie) is the answer; chance for
    comparison (the mean of 1 / choices); and the number of items."""
    if not items:
        raise ConfigError("the cloze evaluation set is empty: pass --cloze-data with at least one item")
    correct = sum(
        max(range(len(s)), key=s.__getitem__) == item["answer"] for item, s in zip(items, scores, strict=True)
    )
    return {
        "accuracy": correct / len(items),
        "chance": sum(1 / len(item["choices"]) for item in items) / len(items),
        "items": float(len(items)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Multiple-choice (cloze) accuracy of a model.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", type=Path, help="corpus folder: the default task from held-out lines")
    source.add_argument("--cloze-data", type=Path, help="jsonl of {context, choices, answer}")
    parser.add_argument("--items", type=int, default=200, help="default task: items to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        if args.cloze_data:
            items = read_items(args.cloze_data)
        else:
            items = default_items(args.corpus, args.items, args.seed)
        device = resolve_device(args.device)
        scores = choice_scores(load_model(args.model, device), Tokenizer.load(args.tokenizer), items, device)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(accuracy(items, scores)))


if __name__ == "__main__":
    main()
