"""Named presets, as code: one bundle of per-stage configs for each way we run the pipeline.

- `tiny`: seconds per stage, for the tests that run real servers and deployments.
- `smoke`: all six stages in minutes on a 2-core CPU; what `make run` and CI exercise.
- `cpu`: a real CPU run on the standard library (25-29 minutes of pretraining, 34 all stages, on 2 cores),
  meant to beat xz on bits per byte.
- `gpu`: a GPT-2-small-sized model (~124M parameters) for one GPU and a real corpus.

A preset only groups configs; each stage receives its own config and nothing else. The one derived
value, the model's vocabulary size, is taken from the tokenizer config here (and, for a preset whose
tokenizer fits its vocabulary to the corpus, from the trained tokenizer by the pipeline). Fine-tuning has
two kinds, instruction tuning (`finetune`) and classification (`classify_train`), both sized here;
`adapter` (full or LoRA) applies to both.
"""

from dataclasses import dataclass, replace

import torch

from llmcore.adapters import AdapterConfig
from llmcore.classify import ClassifyConfig, ClassifyDataConfig
from llmcore.completions import PromptConfig
from llmcore.corpus import CorpusConfig
from llmcore.device import cpu_has_bf16
from llmcore.errors import ConfigError
from llmcore.evaluate import EvalConfig
from llmcore.model import GPTConfig
from llmcore.sampling import SamplingConfig
from llmcore.sft_data import SFTDataConfig
from llmcore.tokenizer import TokenizerConfig
from llmcore.train import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    corpus: CorpusConfig
    tokenizer: TokenizerConfig
    model: GPTConfig
    pretrain: TrainConfig
    sft_data: SFTDataConfig
    finetune: TrainConfig
    evaluation: EvalConfig
    prompts: PromptConfig
    sampling: SamplingConfig
    classify_data: ClassifyDataConfig
    classify: ClassifyConfig
    classify_train: TrainConfig
    adapter: AdapterConfig = AdapterConfig()  # full fine-tuning or LoRA, for both kinds

    def __post_init__(self):
        if self.model.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(
                f"preset {self.name}: model vocab_size {self.model.vocab_size} != tokenizer "
                f"vocab_size {self.tokenizer.vocab_size}: set both with --vocab-size"
            )


def tiny() -> Preset:
    tokenizer = TokenizerConfig(vocab_size=1024)
    finetune = TrainConfig(  # both kinds of fine-tuning train with it
        max_steps=6,
        batch_size=8,
        learning_rate=1e-3,
        warmup_steps=2,
        eval_interval=6,
        eval_batches=2,
        checkpoint_interval=6,
        log_interval=2,
    )
    return Preset(
        name="tiny",
        description="every stage in seconds on 1 MB of the standard library: deployment and server tests",
        corpus=CorpusConfig(source="stdlib", max_bytes=1_000_000),
        tokenizer=tokenizer,
        model=GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=64),
        pretrain=TrainConfig(
            max_steps=30,
            batch_size=8,
            learning_rate=3e-3,
            warmup_steps=5,
            eval_interval=15,
            eval_batches=2,
            checkpoint_interval=15,
            log_interval=5,
        ),
        sft_data=SFTDataConfig(max_response_chars=600),
        finetune=finetune,
        evaluation=EvalConfig(max_tokens=4096),
        prompts=PromptConfig(num_prompts=2),
        sampling=SamplingConfig(max_new_tokens=16, temperature=0.8),
        classify_data=ClassifyDataConfig(max_classes=4, passage_chars=200),
        classify=ClassifyConfig(),
        classify_train=finetune,
    )


def smoke() -> Preset:
    tokenizer = TokenizerConfig(vocab_size=2048)
    return Preset(
        name="smoke",
        description="all six stages in a few minutes on a 2-core CPU (CI, first run)",
        corpus=CorpusConfig(source="stdlib"),
        tokenizer=tokenizer,
        model=GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=128),
        pretrain=TrainConfig(
            max_steps=1000,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=50,
            # warmup-stable-decay beat cosine on held-out bits per byte at equal steps and cost (2.101 vs
            # 2.188 at 300 steps). Muon did better still (1.946; 1.889 with wsd) but is not the default yet:
            # the flow test's 30-step Muon model then greedily completes one prompt with nothing (README,
            # "Recipe options and ablations")
            lr_schedule="wsd",
            eval_interval=250,
            eval_batches=8,
            checkpoint_interval=250,
            log_interval=10,
        ),
        sft_data=SFTDataConfig(max_response_chars=1200),
        finetune=TrainConfig(
            max_steps=120,
            batch_size=16,
            learning_rate=1e-3,
            warmup_steps=10,
            eval_interval=60,
            eval_batches=8,
            checkpoint_interval=60,
            log_interval=20,
        ),
        evaluation=EvalConfig(max_tokens=32_768),
        prompts=PromptConfig(num_prompts=4),
        sampling=SamplingConfig(max_new_tokens=48, temperature=0.8),
        classify_data=ClassifyDataConfig(),
        classify=ClassifyConfig(),
        classify_train=TrainConfig(
            max_steps=150,
            batch_size=16,
            learning_rate=1e-3,
            warmup_steps=15,
            eval_interval=75,
            eval_batches=8,
            checkpoint_interval=75,
            log_interval=25,
        ),
    )


def cpu() -> Preset:
    tokenizer = TokenizerConfig(vocab_size=4096)
    # bf16 autocast where the CPU has bf16 arithmetic: a step takes 0.78x the time of fp32's at this size,
    # so 2480 steps take the wall time of 2000 (README, "Recipe options and ablations"). Elsewhere bf16
    # would be emulated, slower than fp32: fp32. With a GPU, training runs there (`auto`). Fine-tuning
    # gains as much: 600 grouped steps took 287 s against 392 s in fp32, to the same validation loss
    # (2.9565); 300 classification steps ran 0.83x fp32's time, to the same accuracy (0.846).
    bf16 = cpu_has_bf16() and not torch.cuda.is_available()
    precision = "bf16" if bf16 else "auto"
    classify_train = TrainConfig(
        max_steps=300,
        batch_size=16,
        learning_rate=5e-4,
        warmup_steps=20,
        eval_interval=100,
        eval_batches=16,
        checkpoint_interval=100,
        log_interval=25,
        precision=precision,
    )
    # Batches of pairs of like length hold 0.35x the positions: in fp32, 600 steps took 392 s and reached a
    # validation loss of 2.957, against 555 s and 2.961 for 300 steps of mixed lengths (README, "A batch runs
    # only as far as its longest row"); 300 grouped steps reached 2.980, 900 overfit (2.962).
    finetune = replace(classify_train, max_steps=600, group_by_length=True)
    # Pretraining: where bf16 is native, 2480 steps in the wall time of 2000 fp32 ones. A learning rate of
    # 4e-3 lowered validation bits per byte against 2e-3 in both: 1.117 against 1.136 in bf16, 1.124
    # against 1.141 in fp32. A context of 512 at half the rows (the same tokens a step, a step 1.11-1.15x
    # slower, so 0.87x the steps) and windows shifted each epoch lowered it to 1.086 (bf16);
    # a context of 1024 at 4 rows with QK-norm (a step 1.12x slower again, 0.89x the steps) to 1.070, and
    # with QK-norm a learning rate of 6e-3 to 1.059, of 8e-3 to 1.049 (bf16; 1.072 in fp32's 1634 steps).
    # Without QK-norm a context of 1024 trained worse (1.113), of 2048 far worse (1.388); with it, 2048
    # still did (1.339). In fp32 the context-1024 QK-norm step costs 1.22x the context-256 step of the 2000
    # fp32 steps, so 1634 steps take their wall time.
    return Preset(
        name="cpu",
        description="a real CPU run on the stdlib (34 minutes on 2 cores); should beat xz on bits per byte",
        corpus=CorpusConfig(source="stdlib"),
        tokenizer=tokenizer,
        model=GPTConfig(
            vocab_size=tokenizer.vocab_size, block_size=1024, n_layer=4, n_head=4, n_embd=256, qk_norm=True
        ),
        pretrain=TrainConfig(
            max_steps=1921 if bf16 else 1634,
            batch_size=4,
            learning_rate=8e-3,
            shift_windows=True,  # the standard library is read 4 times
            warmup_steps=100,
            # Muon for the blocks' matrices with warmup-stable-decay: README, "Recipe options and ablations"
            optimizer="muon",
            lr_schedule="wsd",
            precision=precision,
            eval_interval=500,  # a validation pass takes ~6.5 s, 8 steps' time
            eval_batches=16,
            checkpoint_interval=250,
            log_interval=25,
        ),
        sft_data=SFTDataConfig(max_response_chars=2000),
        finetune=finetune,
        evaluation=EvalConfig(max_tokens=262_144),
        prompts=PromptConfig(num_prompts=8),
        sampling=SamplingConfig(max_new_tokens=128, temperature=0.8),
        classify_data=ClassifyDataConfig(),
        classify=ClassifyConfig(max_length=256),  # passages of 400 characters: longer rows would be padding
        classify_train=classify_train,
    )


def gpu() -> Preset:
    # GPT-2's vocabulary, padded to a multiple of 64; a corpus that cannot fill it (a small standard
    # library) gets the largest multiple of 64 it can, in the tokenizer and the model alike
    tokenizer = TokenizerConfig(vocab_size=50_304, fit_vocab_to_corpus=True)
    finetune = TrainConfig(  # both kinds of fine-tuning train with it
        max_steps=500,
        batch_size=32,
        learning_rate=1e-4,
        warmup_steps=50,
        eval_interval=100,
        eval_batches=16,
        checkpoint_interval=250,
        log_interval=10,
    )
    return Preset(
        name="gpu",
        description="a ~124M-parameter GPT (GPT-2 small shape) for one GPU; point --corpus at real data",
        corpus=CorpusConfig(source="stdlib"),
        tokenizer=tokenizer,
        model=GPTConfig(
            vocab_size=tokenizer.vocab_size,
            block_size=1024,
            n_layer=12,
            n_head=12,
            n_embd=768,
            tie_embeddings=True,
        ),
        pretrain=TrainConfig(
            max_steps=5000,
            batch_size=32,
            grad_accum_steps=4,
            learning_rate=6e-4,
            warmup_steps=200,
            eval_interval=250,
            eval_batches=32,
            checkpoint_interval=500,
            log_interval=10,
        ),
        sft_data=SFTDataConfig(max_response_chars=4000),
        finetune=finetune,
        evaluation=EvalConfig(max_tokens=1_048_576, batch_size=16),
        prompts=PromptConfig(num_prompts=16),
        sampling=SamplingConfig(max_new_tokens=256, temperature=0.8),
        classify_data=ClassifyDataConfig(),
        classify=ClassifyConfig(),
        classify_train=finetune,
    )


PRESETS = {"tiny": tiny, "smoke": smoke, "cpu": cpu, "gpu": gpu}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: pass --preset one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_vocab_size(preset: Preset, vocab_size: int) -> Preset:
    """Change the vocabulary in both places it lives, the tokenizer and the model."""
    return replace(
        preset,
        tokenizer=replace(preset.tokenizer, vocab_size=vocab_size),
        model=replace(preset.model, vocab_size=vocab_size),
    )
