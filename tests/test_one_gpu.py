"""The one-GPU training path, tested on CPU: precision (bf16 autocast, fp16 with a gradient scaler), the
chunked loss, activation checkpointing, prefetched batches, the MFU peak table, out-of-memory advice and
torch.compile."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmcore.batches import Prefetcher, token_windows
from llmcore.checkpoint import load_checkpoint
from llmcore.device import peak_flops, resolve_precision
from llmcore.errors import ConfigError
from llmcore.losses import linear_cross_entropy
from llmcore.model import GPT, GPTConfig
from llmcore.shards import TokenSplit
from llmcore.train import TrainConfig, fit

MODEL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def windows(batch_size: int = 4, tokens: int = 4000, seed: int | None = 0):
    """Random tokens, or with seed None a repeating, learnable sequence."""
    if seed is None:
        data = np.tile(np.arange(64, dtype=np.uint16), tokens // 64)
    else:
        data = np.random.default_rng(seed).integers(0, 64, size=tokens).astype(np.uint16)
    return token_windows(TokenSplit([data], len(data)), MODEL.block_size, batch_size, 0, "train")


def train(tmp, model: GPT | None = None, learnable: bool = False, **overrides) -> tuple[GPT, dict]:
    config = TrainConfig(
        **{
            **dict(
                max_steps=8,
                batch_size=4,
                learning_rate=1e-2,
                warmup_steps=2,
                eval_interval=8,
                eval_batches=1,
                checkpoint_interval=8,
                log_interval=2,
                device="cpu",
            ),
            **overrides,
        }
    )
    torch.manual_seed(config.seed)
    model = model or GPT(MODEL)
    val = windows(seed=None if learnable else 1).in_order(1)
    return model, fit(model, windows(seed=None if learnable else 0), val, config, tmp)


@pytest.mark.parametrize(
    "name, entry",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),  # the SXM part's name does not say SXM
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GB200", "GB200"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla V100-PCIE-32GB", "V100-PCIE"),
        ("Tesla T4", "T4"),
        ("NVIDIA A10G", None),  # not an A10: no MFU rather than a wrong one
        ("NVIDIA GeForce RTX 4090", None),
        ("AMD Instinct MI300X", None),
    ],
)
def test_peak_flops_are_matched_on_the_full_device_name_longest_first(name, entry):
    found = peak_flops(name)
    assert (found and found[0]) == entry
    if name in ("NVIDIA L40S", "NVIDIA L4"):
        assert found[1] == {"NVIDIA L40S": 362e12, "NVIDIA L4": 121e12}[name]  # L40S was read as L4


def test_precision_resolves_per_device_and_is_validated():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp16", cpu) == torch.float16
    with pytest.raises(ConfigError, match="--precision"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("rows", [1, 7, 24, None])  # one position, a chunk that does not divide, the default
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_full_logits_loss_with_its_gradients(rows, dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 8, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 40, (3, 8), generator=generator)
    targets[0, :3] = targets[2, 7] = -100

    def loss_and_grads(loss_fn):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        (3 * loss).backward()  # a scale, as the training loop divides by the step's tokens
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        return loss, grads

    full, (full_h, full_w) = loss_and_grads(
        lambda: F.cross_entropy(
            F.linear(hidden, weight).float().flatten(0, 1), targets.flatten(), reduction="sum"
        )
    )
    chunked, (chunked_h, chunked_w) = loss_and_grads(
        lambda: linear_cross_entropy(hidden, weight, targets, rows)
    )
    assert chunked.dtype == torch.float32
    # fp32: equal to rounding; bf16: the full path rounds the weight gradient to bf16 once over all rows,
    # the chunked one per chunk and sums in fp32
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked_h, full_h, **tolerance)
    torch.testing.assert_close(chunked_w, full_w, **tolerance)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(MODEL)
    x, y = windows().get(0)
    results = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        _, loss = model(x, y, reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.equal(plain, recomputed)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=0, atol=0, msg=name)


def test_activation_checkpointing_trains_like_the_plain_loop(tmp_path):
    plain, _ = train(tmp_path / "plain", max_steps=2, checkpoint_interval=2, eval_interval=2)
    recomputed, _ = train(
        tmp_path / "recomputed",
        max_steps=2,
        checkpoint_interval=2,
        eval_interval=2,
        activation_checkpointing=True,
    )
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("wrapper", ["classifier", "lora"])
def test_activation_checkpointing_reaches_a_wrapped_trunk(wrapper, tmp_path, monkeypatch):
    """The loop's flag reaches the GPT inside a classifier or a LoRA wrapper: its blocks are recomputed."""
    import llmcore.model
    from llmcore.adapters import AdapterConfig, apply_lora
    from llmcore.batches import Batches
    from llmcore.classify import SequenceClassifier

    recomputed = []
    original = llmcore.model.checkpoint
    monkeypatch.setattr(
        llmcore.model, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k)
    )
    torch.manual_seed(0)
    data = torch.randint(0, 64, (16, 17))
    if wrapper == "classifier":
        model = SequenceClassifier(GPT(MODEL), num_classes=2)
        batches = Batches(16, lambda i: (data[i, :-1], data[i, 0] % 2), batch_size=4, seed=0)
    else:
        model = apply_lora(GPT(MODEL), AdapterConfig(finetune_method="lora", lora_rank=2))
        batches = Batches(16, lambda i: (data[i, :-1], data[i, 1:]), batch_size=4, seed=0)
    config = TrainConfig(
        max_steps=1,
        batch_size=4,
        warmup_steps=1,
        eval_interval=1,
        eval_batches=1,
        checkpoint_interval=1,
        device="cpu",
        activation_checkpointing=True,
    )
    fit(model, batches, batches.in_order(1), config, tmp_path / "ckpt", stage="finetune")
    assert len(recomputed) == MODEL.n_layer  # one training step: each block once


def test_mixed_precision_training_on_cpu_stays_close_to_fp32(tmp_path):
    _, fp32 = train(tmp_path / "fp32", learnable=True, max_steps=20, precision="fp32")
    for precision in ("bf16", "fp16"):
        _, mixed = train(tmp_path / precision, learnable=True, max_steps=20, precision=precision)
        assert mixed["loss"] < 3.0 < np.log(64), precision  # it learns
        assert mixed["loss"] == pytest.approx(fp32["loss"], abs=0.05), precision
        assert mixed["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.05), precision
        scaler = load_checkpoint(tmp_path / precision)["scaler"]
        assert bool(scaler) == (precision == "fp16")  # the gradient scaler's state is checkpointed for resume


def test_fp16_overflow_skips_the_step_and_is_not_a_divergence(tmp_path):
    """An overflowing fp16 step is the gradient scaler's to skip (and lower its scale), not an error."""
    torch.manual_seed(1337)
    model = GPT(MODEL)
    original, calls = model.forward, {"n": 0}

    def overflowing_first_step(x, y=None, **kw):
        calls["n"] += 1
        logits, loss = original(x, y, **kw)
        return (logits, loss * 1e6) if model.training and calls["n"] == 1 else (logits, loss)

    model.forward = overflowing_first_step
    _, metrics = train(tmp_path, model, precision="fp16")
    scale = load_checkpoint(tmp_path)["scaler"]["scale"]
    assert scale < 2.0**16  # the default initial scale was halved: a step was skipped
    assert metrics["grad_scale"] == scale and np.isfinite(metrics["loss"])


def test_precision_and_mfu_basis_are_logged_as_params(tmp_path):
    class Recorder:
        def __init__(self):
            self.params = {}

        def log_params(self, params):
            self.params.update(params)

        def log_metrics(self, metrics, step=None):
            pass

    recorder = Recorder()
    torch.manual_seed(0)
    fit(
        GPT(MODEL),
        windows(),
        windows(seed=1).in_order(1),
        TrainConfig(max_steps=1, batch_size=4, precision="bf16", device="cpu"),
        tmp_path,
        tracker=recorder,
        stage="pretrain",
    )
    assert recorder.params["pretrain"] == {"precision_used": "bf16", "mfu_peak": "no MFU on cpu"}


def test_out_of_memory_is_one_line_naming_what_to_lower(tmp_path):
    model = GPT(MODEL)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.14 GiB")

    model.forward = out_of_memory
    with pytest.raises(ConfigError) as error:
        train(tmp_path, model)
    message = str(error.value)
    assert "\n" not in message and "out of memory on cpu at step 1 (micro-batch 4 x 16 tokens" in message
    for fix in ("--batch-size", "--grad-accum-steps", "--block-size", "--activation-checkpointing"):
        assert fix in message


def test_prefetched_batches_are_the_same_and_errors_surface_at_their_index():
    batches = windows()
    expected = [batches.get(i) for i in range(3, 9)]
    reader = Prefetcher(windows(), start=3)
    for i, (x, y) in enumerate(expected, start=3):
        got = reader.get(i)
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
    with pytest.raises(ValueError, match="batch 11"):
        reader.get(11)  # read in order only
    reader.close()
    assert not reader._thread.is_alive()

    failing = windows()
    real_get = failing.get
    failing.get = lambda i, part=slice(None): (
        real_get(i, part) if i < 2 else (_ for _ in ()).throw(OSError("disk gone"))
    )
    reader = Prefetcher(failing, start=0)
    reader.get(0), reader.get(1)
    with pytest.raises(OSError, match="disk gone"):
        reader.get(2)
    reader.close()


@pytest.mark.compile
def test_torch_compile_trains_on_cpu_like_eager(tmp_path):
    _, eager = train(tmp_path / "eager", max_steps=2, checkpoint_interval=2, eval_interval=2, log_interval=1)
    _, compiled = train(
        tmp_path / "compiled",
        max_steps=2,
        checkpoint_interval=2,
        eval_interval=2,
        log_interval=1,
        compile=True,
    )
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)
