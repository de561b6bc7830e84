"""The lm_eval adapter on a model whose answers are known: a GPT whose weights make it an exact bigram
table (one-hot embeddings, blocks that add nothing, the table as output projection), so every
log-likelihood, greedy generation and multiple-choice answer has an independent reference. The harness
runs a YAML task over a local jsonl file: no hub."""

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from llmcore import lm_eval_adapter
from llmcore.checkpoint import save_model
from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig
from llmcore.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

ANSWER, WRONG = "xyz", ("abc", "mno")  # characters the tiny corpus below tokenizes one by one


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("lm-eval-tok")
    corpus = root / "corpus"
    corpus.mkdir()
    text = "def add(a, b):\n    return a + b\n" * 40
    for split in ("train", "validation"):
        (corpus / f"{split}.jsonl").write_text(
            json.dumps({"id": split, "source": "t.py", "text": text}) + "\n"
        )
    (corpus / "manifest.json").write_text(json.dumps({"content_digest": "lm-eval-test"}))
    train_tokenizer(corpus, root / "tok", TokenizerConfig(vocab_size=300, num_threads=1))
    return Tokenizer.load(root / "tok")


def bigram_gpt(table: torch.Tensor, block_size: int = 16) -> GPT:
    """A GPT whose next-token log-probabilities are log_softmax(table[current token])."""
    vocab = table.size(0)
    width = vocab + vocab % 2  # one head of even size
    model = GPT(
        GPTConfig(
            vocab_size=vocab, block_size=block_size, n_layer=1, n_head=1, n_embd=width, tie_embeddings=False
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight[:, :vocab] = torch.eye(vocab)  # token i -> one-hot(i)
        model.norm_f.weight.fill_(1 / math.sqrt(width))  # RMSNorm of one-hot(i) times this is one-hot(i)
        model.lm_head.weight[:, :vocab] = table.log_softmax(-1).T  # logits = log P(. | i)
    return model.eval()


def forced_table(tokenizer: Tokenizer, seed: int = 0) -> torch.Tensor:
    """Random bigram logits where the answer's tokens are far more likely after any token."""
    table = torch.randn(
        tokenizer.vocab_size, tokenizer.vocab_size, generator=torch.Generator().manual_seed(seed)
    )
    table[:, answer_tokens(tokenizer)] += 8.0
    return table


def answer_tokens(tokenizer: Tokenizer) -> list[int]:
    """The answer's tokens that no wrong choice has (the space before every choice is shared)."""
    wrong = {t for w in WRONG for t in tokenizer.encode(" " + w)}
    only = sorted(set(tokenizer.encode(" " + ANSWER)) - wrong)
    assert len(only) >= 2  # the choices can be told apart
    return only


def reference(
    tokenizer: Tokenizer, table: torch.Tensor, context: str, continuation: str
) -> tuple[float, bool]:
    """Log-probability of the continuation's tokens after the context's, and whether each is its row's
    argmax, read off the table. As in lm_eval: the continuation's tokens are those of context +
    continuation past the context's own token count; end-of-text stands before an empty context."""
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    ids = [tokenizer.eot_id, *head, *whole[len(head) :]]
    steps = [(ids[i], ids[i + 1]) for i in range(len(head), len(whole))]
    logp = table.log_softmax(-1)
    return sum(float(logp[a, b]) for a, b in steps), all(int(table[a].argmax()) == b for a, b in steps)


def test_loglikelihood_rolling_and_greedy_generation_match_the_bigram_table(tokenizer):
    table = forced_table(tokenizer)
    lm = lm_eval_adapter.LlmcoreLM(bigram_gpt(table), tokenizer, batch_size=2)
    pairs = [("def add(a, b):", " return"), ("x" * 40, " a + b"), ("", "def"), ("    return", " " + ANSWER)]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        expected, expected_greedy = reference(tokenizer, table, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy

    text = "def add(a, b):\n    return a + b\n# the quick brown fox jumps over the lazy dog\n"
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    logp = table.log_softmax(-1)
    expected = sum(float(logp[a, b]) for a, b in zip(ids, ids[1:], strict=False))
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert len(ids) > 3 * 16  # several windows of the 16-token context
    assert rolling == pytest.approx(expected, abs=1e-2)

    plain = torch.randn(table.shape, generator=torch.Generator().manual_seed(1))
    chain, current = [], tokenizer.encode("def")[-1]  # greedy decoding of a bigram table, by hand
    while len(chain) < 8 and (current := int(plain[current].argmax())) != tokenizer.eot_id:
        chain.append(current)
    full = tokenizer.decode(chain)
    stop = full[len(full) // 2 :][:2]
    (generated,) = lm_eval_adapter.LlmcoreLM(bigram_gpt(plain), tokenizer).generate_until(
        [Instance("generate_until", {}, ("def", {"until": [stop], "max_gen_toks": 8, "do_sample": False}), 0)]
    )
    assert generated == full.split(stop)[0] and len(generated) < len(full)


def write_task(folder: Path, name: str, rows: list[dict]) -> Path:
    """A multiple-choice YAML task over a local jsonl file, as a user writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def rows(count: int, target_is_answer: bool = True) -> list[dict]:
    """The answer sits at every position in turn, so a scorer that ignores the choices scores 1/3. The
    target is the forced answer, or (target_is_answer False) the wrong choice after it."""
    out = []
    for i in range(count):
        choices = list(WRONG)
        choices.insert(i % 3, ANSWER)
        target = i % 3 if target_is_answer else (i + 1) % 3
        out.append({"context": f"def f{i}(a, b):\n    return", "choices": choices, "answer": target})
    return out


def test_the_harness_scores_local_tasks_where_the_answer_is_forced(tokenizer, tmp_path):
    tasks = tmp_path / "tasks"
    write_task(tasks, "pick_answer", rows(6))
    write_task(tasks, "pick_wrong", rows(6, target_is_answer=False))
    forced = lm_eval_adapter.LlmcoreLM(bigram_gpt(forced_table(tokenizer)), tokenizer)
    scores = lm_eval_adapter.evaluate_tasks(forced, ["pick_answer", "pick_wrong"], [tasks])
    assert scores["pick_answer"]["acc"] == 1.0 and scores["pick_answer"]["acc_stderr"] == 0.0
    assert scores["pick_wrong"]["acc"] == 0.0

    with pytest.raises(
        ConfigError, match="unknown lm_eval task no_such_task: pass --tasks one of pick_answer"
    ):
        lm_eval_adapter.task_manager(["no_such_task"], [tasks], harness_tasks=False)


def test_the_command_line_scores_a_saved_model_and_names_a_missing_model_in_one_line(
    tokenizer, tmp_path, capsys
):
    tasks = write_task(tmp_path / "tasks", "pick_answer", rows(3))
    model_file = tmp_path / "model.pt"
    save_model(model_file, bigram_gpt(forced_table(tokenizer)))
    tokenizer_file = tmp_path / "tokenizer.model"
    tokenizer_file.write_bytes(tokenizer._sp.serialized_model_proto())
    args = ["--tokenizer", str(tokenizer_file), "--tasks", "pick_answer", "--include-path", str(tasks)]
    lm_eval_adapter.main([*args, "--model", str(model_file), "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["pick_answer"]["acc"] == 1.0

    missing = tmp_path / "nothing.pt"
    with pytest.raises(SystemExit) as exit_status:
        lm_eval_adapter.main([*args, "--model", str(missing)])
    assert exit_status.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: model file {missing} does not exist: run pretraining (or fine-tuning) first"
    ]
