"""LoRA through peft on our modules: merge equivalence, adapter save/load, counts, training, bad targets."""

import pytest
import torch

from llmcore.adapters import AdapterConfig, apply_lora, load_adapter, merge, parameter_counts, save_adapter
from llmcore.classify import SequenceClassifier
from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig
from llmcore.sampling import keep_decoding_layout

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def randomize_adapters(model: torch.nn.Module) -> None:
    """peft starts B at zero (the adapter adds nothing); make the update non-zero so equality can fail."""
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.2)


def fresh(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def kept(model: GPT) -> GPT:
    keep_decoding_layout(model)
    return model


# A kept model (llmcore.sampling.keep_decoding_layout) too: peft merges through `weight.data`, which a layer
# running from a packed copy of its weight would not see.
@pytest.mark.parametrize("base", [fresh, lambda: kept(fresh())], ids=["plain", "kept"])
def test_merged_model_gives_the_logits_of_base_plus_adapter(base, tmp_path):
    x = torch.randint(0, 64, (3, 12))
    base_logits = fresh()(x)[0]
    adapted = apply_lora(base(), AdapterConfig(finetune_method="lora", lora_rank=4)).eval()
    randomize_adapters(adapted)
    with torch.no_grad():
        expected = adapted(x)[0]
        save_adapter(adapted, tmp_path / "adapter")
        merged = merge(adapted)
        reloaded = load_adapter(base(), tmp_path / "adapter")  # the same base weights, adapter from disk
        assert type(merged) is GPT
        torch.testing.assert_close(merged(x)[0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(x)[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter mattered


def test_classifier_head_travels_with_the_adapter_and_survives_the_merge(tmp_path):
    x = torch.randint(0, 64, (2, 9))
    torch.manual_seed(0)
    model = apply_lora(
        SequenceClassifier(fresh(), 3), AdapterConfig(lora_rank=2), modules_to_save=("label_head",)
    ).eval()
    c, r = TINY, 2
    shapes = [
        (c.n_embd, 3 * c.n_embd),
        (c.n_embd, c.n_embd),
        (c.n_embd, 2 * c.mlp_hidden),
        (c.mlp_hidden, c.n_embd),
    ]
    adapters = c.n_layer * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)
    # the adapters and the label head train; nothing else (the tied lm_head/embedding stays frozen)
    assert parameter_counts(model)["trainable_params"] == adapters + c.n_embd * 3 + 3
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.model.label_head.modules_to_save["default"].weight.add_(1.0)  # a trained head
        expected = model(x)[0]
        merged = merge(model)
        assert type(merged) is SequenceClassifier
        torch.testing.assert_close(merged(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_parameter_counts_are_exact():
    model = apply_lora(fresh(), AdapterConfig(lora_rank=4, lora_targets="c_attn"))
    c = TINY
    per_layer = 4 * (c.n_embd + 3 * c.n_embd)  # A: r x in, B: out x r for the fused q, k, v projection
    counts = parameter_counts(model)
    assert counts == {
        "trainable_params": c.n_layer * per_layer,
        "total_params": fresh().num_params() + c.n_layer * per_layer,
    }


def test_lora_training_through_fit_changes_only_the_adapters(tmp_path):
    from llmcore.batches import Batches
    from llmcore.train import TrainConfig, fit

    model = apply_lora(fresh(), AdapterConfig(lora_rank=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(0, 64, (32, 17))
    batches = Batches(32, lambda i: (data[i, :-1], data[i, 1:]), batch_size=4, seed=0)
    config = TrainConfig(
        max_steps=3,
        batch_size=4,
        warmup_steps=1,
        eval_interval=3,
        eval_batches=1,
        checkpoint_interval=3,
        log_interval=1,
        device="cpu",
    )
    metrics = fit(model, batches, batches.in_order(1), config, tmp_path / "ckpt", stage="finetune")
    assert metrics["steps"] == 3
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


def test_an_adapter_on_the_output_projection_trains_through_the_summed_training_loss():
    """Training sums its loss without full logits for a plain output projection; a LoRA-wrapped one must
    still take part (it would get no gradient if the loss read the base weight alone)."""
    model = apply_lora(fresh(), AdapterConfig(lora_rank=4, lora_targets="lm_head,c_attn"))
    randomize_adapters(model)
    x, y = torch.randint(0, 64, (3, 12)), torch.randint(0, 64, (3, 12))
    logits, summed = model(x, y, reduction="sum")
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum")
    torch.testing.assert_close(summed, expected)
    summed.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lm_head.lora_" in n}
    assert logits is None and grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("targets", ["c_attn,nope", "blocks", "attn"])
def test_a_target_matching_no_linear_layer_is_a_one_line_error(targets):
    with pytest.raises(ConfigError) as error:
        apply_lora(fresh(), AdapterConfig(finetune_method="lora", lora_targets=targets))
    message = str(error.value)
    assert "\n" not in message and "matches no linear layer" in message and "--lora-targets" in message
    assert "c_attn" in message and "c_fc" in message  # the choices


@pytest.mark.parametrize(
    "fields", [{"finetune_method": "qlora"}, {"lora_rank": 0}, {"lora_dropout": 1.0}, {"lora_targets": " , "}]
)
def test_bad_adapter_config_is_a_one_line_error(fields):
    with pytest.raises(ConfigError) as error:
        AdapterConfig(**fields)
    assert "\n" not in str(error.value) and "--" in str(error.value)


def test_instruction_tuning_with_lora_saves_the_adapter_and_a_merged_model(tmp_path):
    from llmcore.checkpoint import load_model, save_model
    from llmcore.finetune import finetune
    from llmcore.train import TrainConfig
    from tests.tiny_run import build_data

    data = build_data(tmp_path)
    torch.manual_seed(0)
    save_model(
        tmp_path / "base.pt", GPT(GPTConfig(vocab_size=400, block_size=32, n_layer=1, n_head=2, n_embd=32))
    )
    recipe = TrainConfig(
        max_steps=3, batch_size=4, learning_rate=1e-2, warmup_steps=1, eval_batches=1, device="cpu"
    )
    lora = AdapterConfig(finetune_method="lora", lora_rank=2, lora_targets="c_attn")
    manifest = finetune(
        tmp_path / "base.pt", data["tokenizer"], data["sft"], recipe, tmp_path / "out", adapter=lora
    )
    assert 0 < manifest["params"]["trainable_params"] < manifest["params"]["total_params"] / 10
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    base, tuned = (
        load_model(tmp_path / "base.pt").state_dict(),
        load_model(tmp_path / "out" / "model.pt").state_dict(),
    )
    assert tuned.keys() == base.keys()  # merged: a plain GPT, no adapter layers
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith("c_attn.weight") for k in changed)  # only the adapted layers moved
