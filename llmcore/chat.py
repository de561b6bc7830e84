"""The one chat format: how a prompt/response pair becomes tokens, for training, sampling and evaluation.

A turn is `<|user|> prompt <|assistant|> response <|end|>`, delimited by control symbols that raw text can
never produce; labels cover the response and its `<|end|>` only. Fine-tuning, sampling, the pyfunc model
and the response-loss evaluation all cut prompts with `chat_prompt`, so they see the same thing. This
module does not train or batch.
"""

from llmcore.tokenizer import Tokenizer

IGNORE = -100  # target id the loss skips


def chat_prompt(tokenizer: Tokenizer, prompt: str, context: int) -> list[int]:
    """`<|user|> prompt <|assistant|>`, what a fine-tuned model answers, in at most half of `context`
    tokens: a long prompt keeps its start, so that training and generation see the same thing."""
    return [tokenizer.user_id, *tokenizer.encode(prompt)[: max(0, context // 2 - 2)], tokenizer.assistant_id]


def encode_pair(tokenizer: Tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of one chat turn and its labels (IGNORE on the prompt part), cut to max_length + 1.

    The prompt keeps at most half the context so that every example trains on some response.
    """
    prompt_ids = chat_prompt(tokenizer, prompt, max_length)
    response_ids = [*tokenizer.encode(response), tokenizer.end_id]
    ids = (prompt_ids + response_ids)[: max_length + 1]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[: max_length + 1]
    return ids, labels
