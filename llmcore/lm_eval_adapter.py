"""lm-evaluation-harness (`lm_eval`) scoring our models: an `LM` over a model.pt and its tokenizer.

`LlmcoreLM` answers the harness's three request kinds: `loglikelihood` (the log-probability of a
continuation after a context, and whether greedy decoding would produce it: multiple choice, cloze),
`loglikelihood_rolling` (a whole text in windows of the model's context, for perplexity tasks) and
`generate_until` (greedy or sampled text with the KV cache, cut at the task's stop strings). Contexts
longer than the model's context keep their end. `evaluate_tasks` runs tasks by name: those of folders of
YAML task files (`include_path`; a task over local files: `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`), and the harness's own tasks, which download their data from the
Hugging Face hub. This module does not chat-format prompts (a fine-tuned model is scored on plain text),
track runs or know about Prefect; `lm_eval` is an optional extra (`pip install -e ".[eval]"`).

    python -m llmcore.lm_eval_adapter --model DIR/model.pt --tokenizer DIR --tasks NAME[,NAME] \
        --include-path TASKS_DIR [--limit N] [--num-fewshot K]
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcore.checkpoint import load_model
from llmcore.device import resolve_device
from llmcore.errors import ConfigError, require_positive
from llmcore.model import GPT
from llmcore.sampling import SamplingConfig, generate_batch, keep_decoding_layout
from llmcore.tokenizer import Tokenizer

MISSING = "lm_eval is not installed: pip install -e '.[eval]' (or pip install lm_eval)"
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as error:
    if __name__ == "__main__":
        sys.exit(f"error: {MISSING}")
    raise ModuleNotFoundError(MISSING) from error


class LlmcoreLM(TemplateLM):
    """A GPT of llmcore and its tokenizer as an lm_eval model (one process, one device)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 128):
        super().__init__()
        require_positive("batch_size", batch_size)
        require_positive("max_gen_toks", max_gen_toks)
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ConfigError(
                f"model vocab_size {model.config.vocab_size} != tokenizer's {tokenizer.vocab_size}: "
                "pass the tokenizer the model was trained with"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self._device = next(model.parameters()).device

    @classmethod
    def load(
        cls, model_file: Path, tokenizer: Path, device: str = "auto", batch_size: int = 8
    ) -> "LlmcoreLM":
        """From a model.pt (verified, weights only) and a tokenizer folder or .model file; the model is
        only run forward, so it keeps the decoding layout."""
        model = load_model(Path(model_file), resolve_device(device))
        keep_decoding_layout(model)
        return cls(model, Tokenizer.load(tokenizer), batch_size)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id  # documents start after end-of-text in pretraining: the empty context

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return "llmcore-sentencepiece"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Per (key, context ids, continuation ids): the summed log-probability of the continuation and
        whether each of its tokens is the argmax. The sequence is cut to the model's context from the left."""
        rows = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in requests]
        lengths = [len(continuation) for _, _, continuation in requests]
        if any(n == 0 or n > self.max_length for n in lengths):
            raise ConfigError(
                f"a continuation of {max(lengths)} tokens (or none) does not fit the model's context of "
                f"{self.max_length}: score shorter continuations or a model with a larger --block-size"
            )
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            width = max(len(rows[i]) for i in chunk) - 1
            x = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)  # right-padded
            for b, i in enumerate(chunk):
                x[b, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
            with self._autocast():
                logits, _ = self.model(x.to(self._device))  # (B, T, vocab)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for b, i in enumerate(chunk):
                n, end = lengths[i], len(rows[i]) - 1  # the continuation's targets are inputs end-n .. end-1
                target = torch.tensor(rows[i][-n:], device=self._device)
                scores = logprobs[b, end - n : end]  # (n, vocab)
                total = float(scores.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((scores.argmax(-1) == target).all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability, every token scored once, in windows of the model's context that
        each see as much of what came before as fits (after end-of-text for the first token)."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = [
                (None, *make_disjoint_window(window))
                for window in get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1
                )
            ]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (greedily unless the task samples) until end-of-text, max_gen_toks or one
        of the task's stop strings, which is cut off. Requests with the same settings decode as one batch."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            # our end-of-text decodes to "": it stops generation by id, never as a stop string
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            sampling = SamplingConfig(
                max_new_tokens=int(kwargs["max_gen_toks"]),
                temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
                top_k=kwargs.get("top_k") or None,
                top_p=kwargs.get("top_p") if kwargs.get("top_p", 1.0) < 1.0 else None,
            )
            room = max(1, self.max_length - sampling.max_new_tokens)  # the context keeps its end
            prompts = [([self.eot_token_id] + self.tok_encode(requests[i].args[0]))[-room:] for i in indices]
            new = generate_batch(self.model, prompts, sampling, stop_id=self.eot_token_id, max_batch=32)
            for i, ids in zip(indices, new, strict=True):
                text = self.tok_decode(ids)
                for stop in until:
                    if stop:
                        text = text.split(stop, 1)[0]
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                out[i] = text
        return out

    def _autocast(self):
        if self._device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)


def task_manager(tasks: Sequence[str], include_path: Sequence[Path] = (), harness_tasks: bool = True):
    """A TaskManager that knows `tasks`: the include folders alone when they define every task (indexing
    the harness's own ~15k tasks takes seconds), with the harness's tasks otherwise (unless
    `harness_tasks` is False). An unknown name is a ConfigError naming what the folders hold."""
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise ConfigError(
                f"task folder {folder} does not exist: pass --include-path a folder of YAML tasks"
            )
    paths = [str(p) for p in include_path] or None
    manager = TaskManager(include_path=paths, include_defaults=False)
    local = manager.all_tasks
    if harness_tasks and set(tasks) - set(local):
        manager = TaskManager(include_path=paths)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(
            f"unknown lm_eval task {', '.join(unknown)}: pass --tasks one of "
            f"{', '.join(local) or '(no tasks in --include-path)'} from "
            f"{', '.join(map(str, include_path)) or '--include-path'}"
            + (", or a task of `lm_eval ls tasks`" if harness_tasks else "")
        )
    return manager


def evaluate_tasks(
    lm: LlmcoreLM,
    tasks: Sequence[str],
    include_path: Sequence[Path] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    harness_tasks: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm_eval tasks on `lm`; return per task its numeric metrics (`acc`, `acc_norm`, ...,
    `acc_stderr`), named without the harness's `,none` filter suffix. `harness_tasks` False: only the
    tasks of `include_path` are known (no indexing of the harness's own)."""
    from lm_eval.evaluator import simple_evaluate

    if not tasks:
        raise ConfigError("no lm_eval tasks given: pass --tasks NAME[,NAME]")
    manager = task_manager(tasks, include_path, harness_tasks)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=1000,  # a mean's standard error is closed-form; others are bootstrapped
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except FileNotFoundError as error:  # a task's data_files (datasets names the file)
        raise ConfigError(
            f"lm_eval task {', '.join(tasks)}: {str(error).splitlines()[0]}: fix dataset_kwargs.data_files "
            "in the task's YAML"
        ) from None
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for task, metrics in results["results"].items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmcore.lm_eval_adapter",
        description="Score a model on lm-evaluation-harness tasks (local YAML tasks or the harness's own).",
    )
    parser.add_argument("--model", type=Path, required=True, help="model.pt from pretraining or fine-tuning")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder or tokenizer.model")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument(
        "--include-path", type=Path, action="append", default=[], help="folder of YAML tasks (repeatable)"
    )
    parser.add_argument("--limit", type=int, help="score at most this many documents per task")
    parser.add_argument("--num-fewshot", type=int, help="examples in each prompt (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        lm = LlmcoreLM.load(args.model, args.tokenizer, args.device, args.batch_size)
        scores = evaluate_tasks(lm, tasks, args.include_path, args.limit, args.num_fewshot)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
