"""One prompt cut everywhere: a model fine-tuned with `max_length` below its context sees a long prompt cut
the same way in training, sampling, the pyfunc model and the response-loss evaluation.

Each check also shows that cutting at the context length instead would give a different result, so the
test fails if any place goes back to the block size.
"""

import json
from pathlib import Path

import pytest
import torch
from mlflow.pyfunc import PythonModelContext

from llmcore.batches import sft_batches
from llmcore.chat import IGNORE, chat_max_length, chat_prompt
from llmcore.checkpoint import load_model, save_model
from llmcore.completions import complete
from llmcore.evaluate import EvalConfig, evaluate_model
from llmcore.finetune import finetune
from llmcore.losses import token_loss
from llmcore.model import GPT, GPTConfig
from llmcore.sampling import SamplingConfig, generate_batch
from llmcore.sft_data import SFTDataConfig, build_sft_data
from llmcore.tokenizer import Tokenizer
from llmcore.train import TrainConfig
from tests.tiny_run import build_data

BLOCK, MAX_LENGTH = 64, 16
# Sampled, not greedy: a model near its random init greedily repeats the prompt's last token, whatever the
# prompt; sampled with one seed, its output depends on every prompt token.
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict[str, Path]:
    """A tiny model (context 64) fine-tuned for two steps with max_length 16 on pairs whose prompts are
    all far longer than either."""
    root = tmp_path_factory.mktemp("prompt-cut")
    data = build_data(root)
    rows = [
        {
            "prompt": f"Question {i}: " + " ".join(f"word{j * i % 97}" for j in range(60)),
            "response": f"ok {i}",
        }
        for i in range(12)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_sft_data(
        SFTDataConfig(source=str(root / "pairs.jsonl"), validation_fraction=0.4), None, root / "sft"
    )
    torch.manual_seed(0)
    tokenizer = Tokenizer.load(data["tokenizer"])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)
    save_model(root / "base.pt", GPT(config))
    # so small a learning rate that the model stays near its init (two steps at 1e-3 teach it to answer
    # <|end|> to anything, and then every cut gives the same output)
    train = TrainConfig(
        max_steps=2, batch_size=2, learning_rate=1e-6, warmup_steps=1, eval_interval=2, eval_batches=1
    )
    finetune(root / "base.pt", data["tokenizer"], root / "sft", train, root / "ft", max_length=MAX_LENGTH)
    return {**data, "sft": root / "sft", "model": root / "ft" / "model.pt", "base": root / "base.pt"}


def test_fine_tuning_stores_its_max_length_with_the_weights(tuned):
    assert chat_max_length(tuned["model"]) == MAX_LENGTH
    assert chat_max_length(tuned["base"]) == BLOCK  # not fine-tuned for chat: its context length


def _prompts_and_tokenizer(tuned) -> tuple[list[str], Tokenizer]:
    from llmcore.sft_data import read_pairs

    tokenizer = Tokenizer.load(tuned["tokenizer"])
    prompts = [p["prompt"] for p in read_pairs(tuned["sft"], "validation")]
    assert prompts and all(len(tokenizer.encode(p)) > BLOCK for p in prompts)  # cut by either length
    return prompts, tokenizer


def test_training_rows_hold_the_prompt_as_chat_prompt_cuts_it(tuned):
    prompts, tokenizer = _prompts_and_tokenizer(tuned)
    batches = sft_batches(tuned["sft"], "validation", tokenizer, MAX_LENGTH, 1, 0)
    x, y = batches.stack([batches.row(0)])  # the first pair's row
    prompt_part = x[0, : int((y[0] != IGNORE).nonzero()[0]) + 1].tolist()  # inputs up to <|assistant|>
    assert prompt_part == chat_prompt(tokenizer, prompts[0], MAX_LENGTH)
    assert len(prompt_part) == MAX_LENGTH // 2 != len(chat_prompt(tokenizer, prompts[0], BLOCK))


def _sampled_texts(model, tokenizer: Tokenizer, prompts: list[str], length: int) -> list[str]:
    ids = [chat_prompt(tokenizer, p, length) for p in prompts]
    return [tokenizer.decode(new) for new in generate_batch(model, ids, SAMPLING, stop_id=tokenizer.end_id)]


def test_sampling_and_the_pyfunc_model_cut_prompts_as_training_did(tuned):
    from tasks.pyfunc_model import GPTGenerator

    prompts, tokenizer = _prompts_and_tokenizer(tuned)
    model = load_model(tuned["model"])
    expected = _sampled_texts(model, tokenizer, prompts, MAX_LENGTH)
    assert expected != _sampled_texts(model, tokenizer, prompts, BLOCK)  # the cut shows in the output

    rows = complete(tuned["model"], tuned["tokenizer"], prompts, SAMPLING, "cpu", chat=True)
    assert [r["completion"] for r in rows if r["strategy"] == "temperature"] == expected

    config = tuned["sft"].parent / "generator.json"
    config.write_text(json.dumps({"chat": True}))
    artifacts = {
        "model": str(tuned["model"]),
        "tokenizer": str(tuned["tokenizer"] / "tokenizer.model"),
        "config": str(config),
    }
    generator = GPTGenerator()
    generator.load_context(PythonModelContext(artifacts, None))
    params = {
        "max_new_tokens": SAMPLING.max_new_tokens,
        "temperature": SAMPLING.temperature,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 0,
    }
    assert generator.predict(None, prompts, params) == expected


def test_response_loss_scores_the_rows_fine_tuning_trained_on(tuned):
    _, tokenizer = _prompts_and_tokenizer(tuned)
    config = EvalConfig(max_tokens=1024, batch_size=4, device="cpu")

    def loss(model_file: Path, length: int) -> float:
        rows = sft_batches(tuned["sft"], "validation", tokenizer, length, config.batch_size, seed=0)
        batches = rows.in_order(max(1, config.max_tokens // (length * config.batch_size)))
        return token_loss(load_model(model_file), batches, torch.device("cpu"))["loss"]

    scored = evaluate_model(tuned["model"], tuned["tokenizer"], tuned["tokens"], config, tuned["sft"])
    assert scored["response_loss"] == pytest.approx(loss(tuned["model"], MAX_LENGTH), abs=1e-6)
    assert abs(loss(tuned["model"], MAX_LENGTH) - loss(tuned["model"], BLOCK)) > 1e-3
    # the base model, given the fine-tuned model's length, is scored on the same rows
    base = evaluate_model(
        tuned["base"], tuned["tokenizer"], tuned["tokens"], config, tuned["sft"], MAX_LENGTH
    )
    assert base["response_loss"] == pytest.approx(loss(tuned["base"], MAX_LENGTH), abs=1e-6)
