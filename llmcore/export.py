"""Export a trained GPT and its tokenizer as a Hugging Face folder that `transformers` loads as Llama
(Qwen3 for a model with QK-norm: Llama's config cannot express it).

`export_hf(model_file, tokenizer_dir, out_dir)` writes, atomically:
- `config.json` and `generation_config.json`: a `LlamaForCausalLM` config mapped from `GPTConfig` (RoPE
  theta, RMSNorm eps, SwiGLU size, query and key/value heads, tied embeddings, no biases, context length),
  or with `qk_norm` a `Qwen3ForCausalLM` one (the same, plus a query and key RMSNorm per head), with
  `<|endoftext|>` as BOS/pad and `<|endoftext|>` or `<|end|>` as end of generation;
- `model.safetensors`: the weights under Llama's names, fused projections split apart;
- `tokenizer.json` and `tokenizer_config.json`: the sentencepiece model rewritten for the `tokenizers`
  library, so that `AutoTokenizer` gives the ids of `llmcore.tokenizer.Tokenizer` (see `tokenizer_json`);
  `tokenizer.model` beside them for tools that read sentencepiece;
- `manifest.json`: source model and tokenizer digests, the config, versions.

`AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` then need no
code from this project. Exporting needs only torch, sentencepiece and safetensors, not `transformers`.
This module does not train, quantize, convert dtypes or upload anything.

Usage: python -m llmcore.export --model runs/pretrain/<id>/model.pt --tokenizer runs/tokenizer/<id> --out hf/
"""

import argparse
import json
import pickle
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from llmcore.artifacts import MANIFEST, atomic_output_dir, atomic_write_json, file_digest, read_json
from llmcore.errors import ConfigError
from llmcore.model import GPTConfig
from llmcore.tokenizer import EOT, MODEL_FILE, Tokenizer

_SPACE = "\u2581"  # sentencepiece's stand-in for a space


def hf_config(config: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """`config.json` of the `LlamaForCausalLM` (with `qk_norm`: `Qwen3ForCausalLM`, Llama plus a query and
    key RMSNorm per head) that computes what `GPT(config)` computes."""
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        # Our nn.RMSNorm(eps=None) uses the float32 machine epsilon; Llama's norm computes in float32 too.
        "rms_norm_eps": torch.finfo(torch.float32).eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        # No BOS token: documents are separated by <|endoftext|>, so a text starts after one.
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": [tokenizer.eot_id, tokenizer.end_id],
        "pad_token_id": tokenizer.eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    } | (qwen3 if config.qk_norm else {})


def hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and fused matrices -> Llama's (and Qwen3's) names, one tensor per projection.

    No permutation of query/key rows is needed: `llmcore.model.apply_rotary` rotates the pairs
    (x[i], x[i + hd/2]) of each head, which is exactly Llama's `rotate_half` convention. Our QK-norm has
    no weights and follows the rotation, Qwen3's precedes it: a rotation keeps each head's RMS, so norm
    weights of ones compute the same.
    """
    expected = _expected_keys(config)
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(
            f"model weights do not match their config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): export a model.pt written by llmcore training"
        )
    q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["norm_f.weight"]}
    if not config.tie_embeddings:  # tied: transformers ties lm_head to the embedding itself
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q_proj, k_proj, v_proj = state[ours + "attn.c_attn.weight"].split([q, kv, kv], dim=0)
        gate_proj, up_proj = state[ours + "mlp.c_fc.weight"].chunk(2, dim=0)
        out |= {
            theirs + "input_layernorm.weight": state[ours + "norm_1.weight"],
            theirs + "self_attn.q_proj.weight": q_proj,
            theirs + "self_attn.k_proj.weight": k_proj,
            theirs + "self_attn.v_proj.weight": v_proj,
            theirs + "self_attn.o_proj.weight": state[ours + "attn.c_proj.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "norm_2.weight"],
            theirs + "mlp.gate_proj.weight": gate_proj,
            theirs + "mlp.up_proj.weight": up_proj,
            theirs + "mlp.down_proj.weight": state[ours + "mlp.c_proj.weight"],
        }
        if config.qk_norm:
            ones = torch.ones(config.head_dim, dtype=state["wte.weight"].dtype)
            out |= {theirs + "self_attn.q_norm.weight": ones, theirs + "self_attn.k_norm.weight": ones}
    # safetensors refuses tensors that share memory (the splits are views of one matrix).
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def _expected_keys(config: GPTConfig) -> set[str]:
    keys = {"wte.weight", "norm_f.weight", "lm_head.weight"}
    for i in range(config.n_layer):
        keys |= {
            f"blocks.{i}.{name}.weight"
            for name in ("norm_1", "attn.c_attn", "attn.c_proj", "norm_2", "mlp.c_fc", "mlp.c_proj")
        }
    return keys


def tokenizer_json(sp: spm.SentencePieceProcessor) -> dict[str, Any]:
    """The sentencepiece BPE model as a `tokenizers` pipeline that gives `llmcore.tokenizer.Tokenizer`'s ids.

    Pieces are stored with real spaces where sentencepiece writes "▁", and there is no normalizer: a
    literal "▁" in the text is then not in the vocabulary and falls back to its three UTF-8 bytes, as
    `Tokenizer.encode` makes it, instead of becoming a space. Pieces cannot span a literal "▁" either,
    since no merge or piece contains one. Control symbols and <unk> are special added tokens that
    `split_special_tokens` (in tokenizer_config.json) keeps from being matched in text, as in ours.
    BPE merges are every split of a piece into two pieces, ranked by the merged piece's score: the order
    in which sentencepiece's BPE merges. Byte and control pieces never come from merges.
    """
    n = sp.get_piece_size()
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = [
        i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    ]
    pieces = [sp.id_to_piece(i) for i in range(n)]
    for i in normal:
        pieces[i] = pieces[i].replace(_SPACE, " ")
    ids = {pieces[i]: i for i in normal}  # what merges may build from and into
    merges = []
    for i in sorted(normal, key=lambda i: (-sp.get_score(i), i)):
        text = pieces[i]
        splits = [(text[:k], text[k:]) for k in range(1, len(text))]
        merges += sorted(
            ([a, b] for a, b in splits if a in ids and b in ids), key=lambda ab: (ids[ab[0]], ids[ab[1]])
        )
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": {p: i for i, p in enumerate(pieces)},
        "merges": merges,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": sp.id_to_piece(i),
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": model,
    }


def tokenizer_config(sp: spm.SentencePieceProcessor, block_size: int) -> dict[str, Any]:
    """`tokenizer_config.json`: the generic tokenizers-backed class (a Llama-specific one would rebuild
    the pipeline with a dummy prefix and "▁" normalization), no BOS/EOS added, special tokens only as ids."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # user text cannot inject control symbols, as in llmcore.tokenizer
        "clean_up_tokenization_spaces": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "additional_special_tokens": [
            sp.id_to_piece(i)
            for i in range(sp.get_piece_size())
            if sp.is_control(i) and sp.id_to_piece(i) != EOT
        ],
    }


def check_sources(model_file: Path, tokenizer_dir: Path) -> None:
    """Raise ConfigError, cheaply and before any work, unless both sources are there and exportable."""
    if not Path(model_file).is_file():
        raise ConfigError(
            f"model file {model_file} does not exist: pass --model with a model.pt written by "
            "pretraining or fine-tuning"
        )
    _require_bpe_tokenizer(Path(tokenizer_dir))


def _load_model_file(model_file: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    try:
        # weights_only: tensors, dicts and numbers come back; pickled code in the file never runs.
        saved = torch.load(model_file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(
            f"model file {model_file} is not a llmcore model ({str(e).splitlines()[0]}): pass "
            "--model with a model.pt written by pretraining or fine-tuning"
        ) from None
    if not isinstance(saved, dict) or not {"model_config", "model"} <= set(saved):
        raise ConfigError(
            f"model file {model_file} has no model_config and model weights: pass --model with a "
            "model.pt written by pretraining or fine-tuning (not a training checkpoint)"
        )
    known = {f.name for f in fields(GPTConfig)}
    if unknown := sorted(set(saved["model_config"]) - known):
        raise ConfigError(
            f"model file {model_file} has config fields {unknown} that a Llama config cannot "
            "express: export it with the llmcore version that trained it"
        )
    return GPTConfig(**saved["model_config"]), saved["model"]


def _require_bpe_tokenizer(tokenizer_dir: Path) -> None:
    manifest = tokenizer_dir / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            f"no finished tokenizer in {tokenizer_dir} (no {MANIFEST}): pass --tokenizer with a "
            "folder written by `python -m llmcore.tokenizer train`"
        )
    model_type = read_json(manifest)["config"]["model_type"]
    if model_type != "bpe":
        # Measured: 13 of 3030 varied texts segment differently, where equally scored unigram paths tie.
        raise ConfigError(
            f"tokenizer {tokenizer_dir} is a {model_type} model, which Hugging Face's tokenizers "
            "segment differently from sentencepiece on ties: export a model trained with a "
            "--model-type bpe tokenizer"
        )


def export_hf(model_file: Path, tokenizer_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the Hugging Face folder for `model_file` (a model.pt) and `tokenizer_dir`; return the manifest.

    Args:
        model_file: final weights with their config, as `llmcore.checkpoint.save_model` writes them.
        tokenizer_dir: the finished tokenizer folder the model was trained with.
        out_dir: the folder to create or replace, atomically.
    """
    try:
        from safetensors.torch import save_file  # an optional dependency: only export needs it
    except ImportError:
        raise ConfigError(
            "exporting needs the safetensors package: pip install 'llm-pipeline[export]'"
        ) from None

    model_file, tokenizer_dir, out_dir = Path(model_file), Path(tokenizer_dir), Path(out_dir)
    check_sources(model_file, tokenizer_dir)
    config, state = _load_model_file(model_file)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(
            f"model vocab_size {config.vocab_size} != tokenizer's {tokenizer.vocab_size} in "
            f"{tokenizer_dir}: pass the tokenizer the model was trained with"
        )
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / MODEL_FILE))
    weights = hf_state_dict(state, config)
    dtype = state["wte.weight"].dtype

    with atomic_output_dir(out_dir) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(config, tokenizer, dtype))
        atomic_write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": tokenizer.eot_id,
                "eos_token_id": [tokenizer.eot_id, tokenizer.end_id],
                "pad_token_id": tokenizer.eot_id,
            },
        )
        # ensure_ascii off: pieces are text, and the file stays readable
        (tmp / "tokenizer.json").write_text(
            json.dumps(tokenizer_json(sp), ensure_ascii=False), encoding="utf-8"
        )
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(sp, config.block_size))
        shutil.copyfile(tokenizer_dir / MODEL_FILE, tmp / MODEL_FILE)
        manifest = {
            "format": "huggingface-llama",
            "model_config": asdict(config),
            "parameters": sum(t.numel() for t in weights.values()),
            "dtype": str(dtype).removeprefix("torch."),
            "source_model": str(model_file),
            "source_model_digest": file_digest(model_file),
            "tokenizer_digest": file_digest(tokenizer_dir / MODEL_FILE),
            "eot_id": tokenizer.eot_id,
            "end_id": tokenizer.end_id,
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "sentencepiece": spm.__version__,
                "safetensors": _version("safetensors"),
            },
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmcore.export",
        description="Export a model and its tokenizer as a Hugging Face Llama folder.",
    )
    parser.add_argument("--model", type=Path, required=True, help="model.pt from pretraining or fine-tuning")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder used in training")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        manifest = export_hf(args.model, args.tokenizer, args.out)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
