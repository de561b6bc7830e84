"""The one chat format: how a prompt/response pair becomes tokens, for training, sampling and evaluation.

A turn is `<|user|> prompt <|assistant|> response <|end|>`, delimited by control symbols that raw text can
never produce; labels cover the response and its `<|end|>` only. Fine-tuning, sampling, the pyfunc model
and the response-loss evaluation all cut prompts with `chat_prompt` at the fine-tuning `max_length`, which
is stored with the fine-tuned weights (`chat_max_length` reads it), so they see the same thing. This
module does not train or batch.
"""

from pathlib import Path
from typing import NamedTuple

from llmcore.checkpoint import read_model_meta
from llmcore.tokenizer import Tokenizer

IGNORE = -100  # target id the loss skips


def chat_prompt(tokenizer: Tokenizer, prompt: str, max_length: int) -> list[int]:
    """`<|user|> prompt <|assistant|>`, what a fine-tuned model answers, in at most half of the
    fine-tuning `max_length`: a long prompt keeps its start, so that training and generation see the same
    thing."""
    return [
        tokenizer.user_id,
        *tokenizer.encode(prompt)[: max(0, max_length // 2 - 2)],
        tokenizer.assistant_id,
    ]


def chat_max_length(model_file: Path) -> int:
    """The `max_length` a model was fine-tuned with, stored with its weights: what its prompts are cut to
    wherever it answers or is scored. A model that was not fine-tuned for chat (or was, before the length
    was stored) gives its context length."""
    meta = read_model_meta(model_file)
    return int(meta.get("max_length") or meta["model_config"]["block_size"])


class Turn(NamedTuple):
    """One encoded chat turn: token ids, labels (IGNORE on the prompt part), and whether it was cut."""

    ids: list[int]
    labels: list[int]
    cut: bool


def encode_pair(tokenizer: Tokenizer, prompt: str, response: str, max_length: int) -> Turn:
    """One chat turn as at most max_length + 1 token ids and labels.

    The prompt keeps at most half the context, so that every example trains on some response. A response
    too long for the rest is cut in tokens and still ends with `<|end|>`: a model must always see where an
    answer stops.
    """
    prompt_tokens = tokenizer.encode(prompt)
    prompt_ids = chat_prompt(tokenizer, prompt, max_length)
    response_tokens = tokenizer.encode(response)
    room = max_length - len(prompt_ids)  # response tokens that fit before <|end|>
    response_ids = [*response_tokens[:room], tokenizer.end_id]
    cut = len(prompt_ids) < len(prompt_tokens) + 2 or len(response_tokens) > room
    return Turn(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, cut)
