"""The generation-sampling stage: completions of held-out prompts under each decoding strategy.

Prompts are drawn deterministically from validation documents (the model never trained on them), and
for a fine-tuned model from held-out instructions; each is completed greedily and with temperature,
top-k and top-p sampling (`llmcore.sampling`, KV cache, stop at end-of-text). For Python corpora the
share of completions that parse with `ast`, once closed at a line boundary, tells whether the model
writes code. On any corpus, per strategy: distinct-2 (distinct word bigrams over all bigrams of the
strategy's completions; low means the samples say the same things) and the repetition rate (the share
of each completion's word 4-grams that repeat an earlier 4-gram of the same completion; high means the
model loops). Words are whitespace-separated. This module does not log or render tables.

    python -m llmcore.completions --model DIR/model.pt --tokenizer DIR --corpus DIR
"""

import argparse
import ast
import json
from dataclasses import dataclass, replace
from pathlib import Path

from llmcore.chat import chat_max_length, chat_prompt
from llmcore.checkpoint import load_model
from llmcore.corpus import read_documents
from llmcore.device import resolve_device
from llmcore.errors import ConfigError, require_positive
from llmcore.sampling import SamplingConfig, generate_batch, keep_decoding_layout
from llmcore.sft_data import read_pairs
from llmcore.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptConfig:
    num_prompts: int = 8  # held-out documents to draw prompts from
    prompt_lines: int = 6  # at most this many lines per prompt
    prompt_chars: int = 400  # and at most this many characters

    def __post_init__(self):
        for name in ("num_prompts", "prompt_lines", "prompt_chars"):
            require_positive(name, getattr(self, name))


def strategies(base: SamplingConfig) -> dict[str, SamplingConfig]:
    """The four decoding strategies compared in every run, sharing length and seed."""
    temperature = base.temperature or 0.8
    return {
        "greedy": replace(base, temperature=0.0, top_k=None, top_p=None),
        "temperature": replace(base, temperature=temperature, top_k=None, top_p=None),
        "top_k": replace(base, temperature=temperature, top_k=base.top_k or 40, top_p=None),
        "top_p": replace(base, temperature=temperature, top_k=None, top_p=base.top_p or 0.9),
    }


def held_out_prompts(corpus_dir: Path, config: PromptConfig) -> list[str]:
    """Openings of evenly spaced validation documents, cut at a line boundary.

    A prompt ends at the document's first top-level `def`/`class` line (without its newline), with up to
    prompt_lines lines before it, so code prompts ask for a body; a document without one (prose, notes,
    table rows) gives its opening lines, at most half of it and cut at a line or word boundary, so the
    document itself says how it goes on.
    """
    documents = [d["text"] for d in read_documents(corpus_dir, "validation") if d["text"].strip()]
    if not documents:
        raise ConfigError(
            f"no validation documents in {corpus_dir}: run corpus ingestion with a larger corpus"
        )
    picks = [
        documents[i * len(documents) // config.num_prompts]
        for i in range(min(config.num_prompts, len(documents)))
    ]
    prompts = []
    for text in picks:
        lines = text.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if line.startswith(("def ", "class "))), None)
        if start is None:
            opening = "".join(lines[: config.prompt_lines])[
                : max(1, min(config.prompt_chars, len(text) // 2))
            ]
            cut = max(opening.rfind("\n"), opening.rfind(" "))
            prompts.append((opening[:cut] if cut > 0 else opening).rstrip())
            continue
        chosen = lines[max(0, start - config.prompt_lines + 1) : start + 1]
        # No trailing newline: the tokenizer merges a newline with the indentation after it, so a prompt
        # ending in a bare newline token would ask the model to continue from a place it never saw.
        prompt = "".join(chosen).rstrip("\n")
        if len(prompt) > config.prompt_chars:
            prompt = prompt[-config.prompt_chars :]
            prompt = prompt[prompt.find("\n") + 1 :] or prompt
        prompts.append(prompt)
    return prompts


def held_out_instructions(sft_dir: Path, num_prompts: int) -> list[str]:
    """Instructions of evenly spaced held-out prompt/response pairs, for the fine-tuned model."""
    pairs = read_pairs(sft_dir, "validation")
    return [pairs[i * len(pairs) // num_prompts]["prompt"] for i in range(min(num_prompts, len(pairs)))]


def complete(
    model_path: Path,
    tokenizer_dir: Path,
    prompts: list[str],
    sampling: SamplingConfig,
    device: str = "auto",
    chat: bool = False,
) -> list[dict[str, str]]:
    """One row per (strategy, prompt): the completion text. `chat` wraps prompts as a user turn."""
    model = load_model(model_path, resolve_device(device))
    keep_decoding_layout(model)  # it only generates here
    tokenizer = Tokenizer.load(tokenizer_dir)
    stop = tokenizer.end_id if chat else tokenizer.eot_id
    max_length = chat_max_length(model_path)
    rows = []
    for name, config in strategies(sampling).items():
        ids = [
            chat_prompt(tokenizer, prompt, max_length) if chat else tokenizer.encode(prompt)
            for prompt in prompts
        ]
        # one batch per strategy
        for prompt, new in zip(prompts, generate_batch(model, ids, config, stop_id=stop), strict=True):
            rows.append({"strategy": name, "prompt": prompt, "completion": tokenizer.decode(new)})
    return rows


def parses_as_python(prompt: str, completion: str) -> bool:
    """Does prompt + completion, cut after its last complete line, parse with `ast`?

    A completion that does not finish at least one line of its own does not count: the prompt alone
    would be judged otherwise.
    """
    text = prompt + completion
    end = text.rfind("\n") + 1
    if end <= len(prompt):
        return False
    try:
        ast.parse(text[:end])
    except (SyntaxError, ValueError):
        return False
    return True


def is_python_corpus(corpus_dir: Path) -> bool:
    """Are most held-out documents Python files (so that the parse rate means something)?"""
    sources = [d["source"] for d in read_documents(corpus_dir, "validation")]
    return sum(s.endswith(".py") for s in sources) > len(sources) / 2


def python_parse_rate(rows: list[dict[str, str]]) -> float:
    return sum(parses_as_python(r["prompt"], r["completion"]) for r in rows) / max(1, len(rows))


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """Distinct word n-grams over all word n-grams of the texts pooled (Li et al., 2016); None when the
    texts have no n-gram."""
    grams = [g for text in texts for g in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(texts: list[str], n: int = 4) -> float | None:
    """Share of the texts' word n-grams that repeat an earlier n-gram of the same text (seq-rep-n of
    Welleck et al., 2019, pooled over texts); None when the texts have no n-gram."""
    total = repeats = 0
    for text in texts:
        grams = _ngrams(text, n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else None


def row_scores(completion: str) -> dict[str, float | None]:
    """The per-row columns of the samples table."""
    return {"distinct_2": distinct_n([completion]), "repetition_rate": repetition_rate([completion])}


def strategy_scores(rows: list[dict[str, str]]) -> dict[str, float]:
    """`<strategy>_distinct_2` and `<strategy>_repetition_rate` over each strategy's completions (left
    out where a strategy's completions are too short to have any)."""
    scores = {}
    for name in dict.fromkeys(r["strategy"] for r in rows):
        texts = [r["completion"] for r in rows if r["strategy"] == name]
        for key, value in (("distinct_2", distinct_n(texts)), ("repetition_rate", repetition_rate(texts))):
            if value is not None:
                scores[f"{name}_{key}"] = value
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Complete held-out prompts with each decoding strategy.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument(
        "--corpus", type=Path, required=True, help="corpus folder (prompts come from validation)"
    )
    parser.add_argument("--num-prompts", type=int, default=PromptConfig.num_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    prompts = held_out_prompts(args.corpus, PromptConfig(num_prompts=args.num_prompts))
    rows = complete(
        args.model,
        args.tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=args.max_new_tokens, seed=args.seed),
        args.device,
    )
    print(json.dumps([{**r, **row_scores(r["completion"])} for r in rows], indent=2))
    print(f"python parse rate: {python_parse_rate(rows):.3f}")
    print(json.dumps(strategy_scores(rows)))


if __name__ == "__main__":
    main()
