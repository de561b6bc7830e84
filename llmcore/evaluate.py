"""Evaluation on held-out data, against honest baselines.

Loss, perplexity and bits per byte of a model on the validation token shards; the gzip -9, bz2 -9 and
xz -9 bits per byte of exactly the text those tokens spell, so every run shows whether the model beats a
general-purpose compressor; and the response-only loss on held-out instruction pairs. Bits per byte
divide the summed loss (in bits) by the UTF-8 bytes the scored target tokens stand for, so the figure
does not depend on the tokenizer.

`bpb` scores the tokens in non-overlapping windows of the model's context, so the first tokens of each
window are predicted from almost nothing; `bpb_strided` scores exactly the same target tokens with a
sliding window that advances `bpb_stride` tokens at a time, so every token after the first window has at
least (context - stride) tokens of context. With the stride equal to the context the two are equal.
Given cloze items (`llmcore.multiple_choice`), the evaluation also reports multiple-choice accuracy.
This module does not train or sample.

    python -m llmcore.evaluate --model DIR/model.pt --tokenizer DIR --tokens DIR [--sft DIR] [--corpus DIR]
"""

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcore import contamination, multiple_choice
from llmcore.baselines import compressor_bits_per_byte
from llmcore.batches import Batches, sft_batches, token_windows
from llmcore.chat import chat_max_length
from llmcore.checkpoint import load_model
from llmcore.cli import add_config_flags, given
from llmcore.corpus import read_documents
from llmcore.device import require_device, resolve_device
from llmcore.errors import ConfigError, require_positive
from llmcore.losses import LossSums, position_losses, token_loss
from llmcore.sft_data import read_pairs
from llmcore.shards import TokenSplit, open_split
from llmcore.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    max_tokens: int = 65_536  # held-out tokens scored; the compressors get the same text
    batch_size: int = 8  # sequences per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bpb_stride: int | None = None  # sliding-window step of bpb_strided in tokens; None: half the context
    cloze_items: int = 200  # items of the default cloze task, drawn from held-out documents
    cloze_data: str | None = None  # a jsonl of {context, choices, answer} to use instead of the default task

    def __post_init__(self):
        require_positive("max_tokens", self.max_tokens)
        require_positive("batch_size", self.batch_size)
        require_device(self.device)
        if self.bpb_stride is not None:
            require_positive("bpb_stride", self.bpb_stride)
        require_positive("cloze_items", self.cloze_items)

    def stride(self, block_size: int) -> int:
        """The sliding window's step for a model of this context length."""
        return min(self.bpb_stride or max(1, block_size // 2), block_size)


def held_out_windows(split: TokenSplit, block_size: int, config: EvalConfig) -> tuple[Batches, int]:
    """The validation split's non-overlapping windows, and how many of the first are held out: max_tokens'
    worth, at least one batch. ConfigError for a split shorter than one window."""
    windows = token_windows(split, block_size, config.batch_size, 0, "validation")
    num_batches = max(1, config.max_tokens // (block_size * config.batch_size))
    return windows, min(windows.num_rows, num_batches * config.batch_size)


def held_out_batches(tokens_dir: Path, block_size: int, config: EvalConfig):
    """The first max_tokens validation tokens as non-overlapping (input, target) windows."""
    windows, count = held_out_windows(open_split(tokens_dir, "validation"), block_size, config)
    return windows.in_order(math.ceil(count / config.batch_size))


def window_batches(
    ids: torch.Tensor, block_size: int, stride: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Windows of up to `block_size` inputs over `ids` that score its targets ids[1:] two ways in one pass,
    as batches (inputs, non-overlapping targets, strided targets), -100 where a way does not score.

    Non-overlapping: the windows that start at multiples of `block_size` score every target in them.
    Strided: a window starts every `stride` tokens and scores the targets no earlier one reached, so all
    but the first window's targets have at least block_size - stride tokens of context. Each way scores
    every target once (stride <= block_size). When `stride` divides `block_size`, the non-overlapping
    windows are strided ones; otherwise they are added, scoring one way only."""
    num_targets = len(ids) - 1
    fresh, start, scored = {}, 0, 0  # strided window start -> targets before it already scored
    while scored < num_targets:
        fresh[start] = scored
        start, scored = start + stride, min(start + block_size, num_targets)
    windows = []
    for start in sorted(fresh.keys() | set(range(0, num_targets, block_size))):
        end = min(start + block_size, num_targets)
        y = ids[start + 1 : end + 1]
        plain, strided = y.clone(), y.clone()
        if start % block_size:
            plain[:] = -100
        if start in fresh:
            strided[: max(0, fresh[start] - start)] = -100
        else:
            strided[:] = -100
        windows.append((ids[start:end], plain, strided))
    batches = []
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        width = max(len(x) for x, _, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        ys = torch.full((2, len(chunk), width), -100, dtype=torch.long)  # a short last window: tail ignored
        for row, (wx, *wy) in enumerate(chunk):
            x[row, : len(wx)] = wx
            for view, targets in enumerate(wy):
                ys[view, row, : len(targets)] = targets
        batches.append((x, ys[0], ys[1]))
    return batches


def stream_loss(
    model: torch.nn.Module,
    streams: Sequence[torch.Tensor],
    stride: int,
    batch_size: int,
    device: torch.device,
    token_bytes: torch.Tensor,
) -> tuple[dict[str, float], dict[str, float]]:
    """`token_loss` of the targets ids[1:] of each stream of ids, in non-overlapping windows of the model's
    context and in windows every `stride` tokens (`window_batches`), from one forward pass over the
    windows."""
    block = model.config.block_size
    batches = [batch for ids in streams for batch in window_batches(ids, block, stride, batch_size)]
    # a window's every target is scored in the forward pass; each way then sums the ones it scores
    everything = ((x, torch.maximum(plain, strided)) for x, plain, strided in batches)
    sums = LossSums(token_bytes), LossSums(token_bytes)
    for (losses, _), (_, *views) in zip(position_losses(model, everything, device), batches, strict=True):
        for way, targets in zip(sums, views, strict=True):
            way.add(losses, targets.to(device))
    return sums[0].result(), sums[1].result()


def held_out_streams(tokens_dir: Path, block_size: int, config: EvalConfig) -> list[torch.Tensor]:
    """The tokens of the windows of `held_out_batches`, as one stream per shard they lie in (windows do not
    cross shards): each stream's non-overlapping windows are those windows, its targets theirs."""
    split = open_split(tokens_dir, "validation")
    _, left = held_out_windows(split, block_size, config)
    streams = []
    for shard in split.shards:
        windows = min(left, (len(shard) - 1) // block_size)
        if windows:
            streams.append(torch.from_numpy(shard[: windows * block_size + 1].astype("int64")))
        left -= windows
    return streams


def evaluate_model(
    model_path: Path,
    tokenizer_dir: Path,
    tokens_dir: Path,
    config: EvalConfig,
    sft_dir: Path | None = None,
    max_length: int | None = None,
    cloze: Sequence[dict] | None = None,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte of one model, non-overlapping and strided (with the
    stride used, `bpb_stride`), plus the compressors on the same text; with `sft_dir`, also the loss on
    the response tokens of the held-out instruction pairs (the prompt is context only), cut as fine-tuning
    cut them: to `max_length`, by default the one stored with the model (`llmcore.chat.chat_max_length`;
    pass the fine-tuned model's to score a base model on the same rows); with `cloze` items, the
    multiple-choice `cloze_accuracy` next to `cloze_chance`."""
    device = resolve_device(config.device)
    model = load_model(model_path, device)
    tokenizer = Tokenizer.load(tokenizer_dir)
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    block = model.config.block_size
    streams = held_out_streams(tokens_dir, block, config)
    stride = config.stride(block)
    result, strided = stream_loss(model, streams, stride, config.batch_size, device, token_bytes)
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    result["bpb_strided"], result["bpb_stride"] = strided["bpb"], float(stride)
    text = tokenizer.decode(torch.cat([ids[1:] for ids in streams]).tolist()).encode("utf-8")
    result.update(compressor_bits_per_byte(text), text_bytes=float(len(text)))
    if sft_dir is not None:
        max_length = max_length or chat_max_length(model_path)
        pairs = sft_batches(sft_dir, "validation", tokenizer, max_length, config.batch_size, seed=0)
        num_batches = max(1, config.max_tokens // (max_length * config.batch_size))
        result["response_loss"] = token_loss(model, pairs.in_order(num_batches), device)["loss"]
    if cloze:
        result |= cloze_accuracy(model, tokenizer, cloze, device, config.batch_size)
    return result


def cloze_accuracy(
    model: torch.nn.Module, tokenizer: Tokenizer, cloze: Sequence[dict], device: torch.device, batch_size: int
) -> dict[str, float]:
    """`cloze_accuracy`, `cloze_chance` and `cloze_items` of one model on multiple-choice items."""
    scores = multiple_choice.choice_scores(model, tokenizer, cloze, device, batch_size)
    return {f"cloze_{k}": v for k, v in multiple_choice.accuracy(cloze, scores).items()}


def cloze_set(config: EvalConfig, corpus_dir: Path | None, block_size: int) -> list[dict]:
    """The user's cloze items (`cloze_data`), else the default task from the corpus's held-out documents,
    with lines short enough for a model of `block_size` tokens; none without either, or (with a warning)
    when no held-out document has enough distinct lines."""
    if config.cloze_data:
        return multiple_choice.read_items(Path(config.cloze_data))
    if corpus_dir is None:
        return []
    max_line_bytes = min(multiple_choice.MAX_LINE_BYTES, block_size - 1)  # one token may cross into it
    try:
        return multiple_choice.default_items(corpus_dir, config.cloze_items, max_line_bytes=max_line_bytes)
    except ConfigError as error:  # a corpus of one-line documents: no default task, the rest still runs
        log.warning("cloze evaluation skipped: %s", error)
        return []


def evaluation_sets(
    corpus_dir: Path, text_bytes: int, cloze: Sequence[dict], sft_dir: Path | None
) -> dict[str, list[str]]:
    """The texts every evaluation scores, by set, for the contamination check: the held-out documents
    behind the scored bytes, each cloze item's context with its answer, each held-out instruction pair."""
    sets = {
        "held_out_text": held_out_text(corpus_dir, text_bytes),
        "cloze": [item["context"] + item["choices"][item["answer"]] for item in cloze],
    }
    if sft_dir is not None:
        sets["sft_validation"] = [
            p["prompt"] + "\n" + p["response"] for p in read_pairs(sft_dir, "validation")
        ]
    return {name: texts for name, texts in sets.items() if texts}


def evaluate_stage(
    models: dict[str, Path],
    tokenizer_dir: Path,
    tokens_dir: Path,
    config: EvalConfig,
    sft_dir: Path | None = None,
    corpus_dir: Path | None = None,
) -> tuple[dict[str, float], dict | None, int]:
    """The evaluate stage's figures for named models: `<name>_<metric>` of every model (`evaluate_model`,
    with the cloze task of the corpus or config), the compressors and cloze chance once, and with the
    corpus the contamination of every evaluation set by its training split. Returns (metrics, the
    contamination report or None, the strided windows' stride)."""
    metrics: dict[str, float] = {}
    # Every model's response loss on the rows fine-tuning trained on: pairs cut to its max_length.
    max_length = chat_max_length(models["finetuned"]) if "finetuned" in models else None
    block_size = min(load_model(f).config.block_size for f in models.values())
    cloze = cloze_set(config, corpus_dir, block_size)
    for name, model_file in models.items():
        result = evaluate_model(
            model_file, tokenizer_dir, tokens_dir, config, sft_dir, max_length=max_length, cloze=cloze
        )
        for key in ("gzip_bpb", "bz2_bpb", "xz_bpb", "text_bytes", "cloze_chance", "cloze_items"):
            if key in result:
                metrics[key] = result.pop(key)
        stride = int(result.pop("bpb_stride"))
        metrics |= {f"{name}_{k}": v for k, v in result.items()}
    report = None
    if corpus_dir:
        sets = evaluation_sets(corpus_dir, int(metrics["text_bytes"]), cloze, sft_dir)
        texts = (d["text"] for d in read_documents(corpus_dir, "train"))
        report = contamination.contamination(sets, texts)
        metrics |= contamination.contaminated_fractions(report)
    return metrics, report, stride


def held_out_text(corpus_dir: Path, max_bytes: int) -> list[str]:
    """The corpus's validation documents, in id order, up to about `max_bytes` UTF-8 bytes (the last one
    cut)."""
    texts, total = [], 0
    for document in read_documents(corpus_dir, "validation"):
        data = document["text"].encode("utf-8")[: max_bytes - total]
        texts.append(data.decode("utf-8", errors="ignore"))
        total += len(data)
        if total >= max_bytes:
            break
    return texts


def score_text(
    model_path: Path, tokenizer_dir: Path, texts: Sequence[str], config: EvalConfig, strided: bool = False
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of one model on `texts`, encoded with the model's own tokenizer;
    with `strided`, also `bpb_strided` over the same targets with sliding windows (and its `bpb_stride`).

    Models with different tokenizers (or context lengths) are compared on exactly the same bytes: the
    texts are joined by end-of-text into one stream and every token after the first is scored, in
    non-overlapping windows of the model's context. Loss and perplexity are per token of the model's
    tokenizer; bits per byte is the figure that compares across tokenizers.
    """
    device = resolve_device(config.device)
    model = load_model(model_path, device)
    tokenizer = Tokenizer.load(tokenizer_dir)
    ids = torch.tensor([i for ids in tokenizer.encode_batch(list(texts)) for i in (*ids, tokenizer.eot_id)])
    if len(ids) < 2:
        raise ConfigError("no held-out text to score: the corpus has an empty validation split")
    block = model.config.block_size
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    stride = config.stride(block) if strided else block  # a stride of the whole context: one way
    result, by_stride = stream_loss(model, [ids], stride, config.batch_size, device, token_bytes)
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if strided:
        result["bpb_strided"], result["bpb_stride"] = by_stride["bpb"], float(stride)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on held-out tokens against gzip/bz2/xz.")
    parser.add_argument(
        "--model", type=Path, required=True, help="model.pt written by pretraining or fine-tuning"
    )
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--sft", type=Path, help="instruction pairs folder, for the response-only loss")
    parser.add_argument("--corpus", type=Path, help="corpus folder, for the default cloze task")
    add_config_flags(parser, EvalConfig)
    args = vars(parser.parse_args(argv))
    try:
        config = EvalConfig(**given(EvalConfig, args))
        cloze = cloze_set(config, args["corpus"], load_model(args["model"]).config.block_size)
        result = evaluate_model(
            args["model"], args["tokenizer"], args["tokens"], config, args["sft"], cloze=cloze
        )
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps({"config": asdict(config), **result}, indent=2))


if __name__ == "__main__":
    main()
