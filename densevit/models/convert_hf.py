"""Hugging Face transformers checkpoints -> the official layouts that :mod:`densevit.models.weights` reads.

One converter per transformers class, each recognised by its keys (as ``save_pretrained`` writes them and the
Hub's ``facebook/*`` repositories hold them):

* ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> facebookresearch/dinov2: the separate ``query`` / ``key`` /
  ``value`` projections are stacked into the fused ``qkv``, ``layer_scale{1,2}.lambda1`` is ``ls{1,2}.gamma``,
  ``register_tokens`` and ``mask_token`` keep their meaning, the SwiGLU ``weights_in`` / ``weights_out`` (ViT-g)
  are the official ``w12`` / ``w3``.
* ``DINOv3ViTModel`` -> facebookresearch/dinov3: ``q/k/v_proj`` stacked into ``qkv`` (the key bias, absent in the
  file, is zero as in the official model; a key bias that is not zero is refused later), ``register_tokens`` are
  the storage tokens, ``up/down_proj`` the MLP (``gate/up/down_proj``: the SwiGLU ``w1/w2/w3``), and the RoPE
  periods, which transformers computes from ``rope_theta`` instead of storing them, are computed the same way
  (``rope_theta ** (4 k / head_dim)``: the reciprocal of transformers' ``inv_freq``) from the folder's
  ``config.json`` (transformers' default 100 without one).

Keys the converter does not know are passed through unchanged, so the strict fit check names them. Which
layout each class feeds is written once, in :data:`densevit.models.layouts.LAYOUTS`."""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import torch

Tensors = Dict[str, torch.Tensor]

DINOV2, DINOV2_REG, DINOV3 = "Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel"


def detect(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The transformers class whose layout ``sd`` has, or ``None`` for any other layout."""
    if "embeddings.cls_token" not in sd:
        return None
    if any(k.startswith(("layer.", "model.layer.")) for k in sd):
        return DINOV3
    if any(k.startswith("encoder.layer.") for k in sd):
        return DINOV2_REG if "embeddings.register_tokens" in sd else DINOV2
    return None


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def _stack_qkv(sd: Tensors, pre: str, names: str, out_prefix: str) -> None:
    """Pop the separate q / k / v projections of one block (``pre`` + each of ``names``) and write the fused
    ``qkv.weight`` / ``qkv.bias``; a bias the file lacks is zero (what a ``Linear(bias=False)`` computes)."""
    roles = names.split()
    w = [sd.pop(pre + r + ".weight") for r in roles]
    sd[out_prefix + "qkv.weight"] = torch.cat(w)
    biases = [sd.pop(pre + r + ".bias", None) for r in roles]
    if any(b is not None for b in biases):
        sd[out_prefix + "qkv.bias"] = torch.cat([b if b is not None else w[0].new_zeros(w[0].shape[0]) for b in biases])


_V2_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"), (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."), (r"^layernorm\.", "norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
)


_V2_MEMORY = ((r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.down_proj\.", ".mlp.weights_out."))


def dinov2_to_official(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """``Dinov2Model`` and ``Dinov2WithRegistersModel`` (same keys but ``register_tokens``) -> official DINOv2.
    Also reads the names transformers >= 5 uses in memory (``model.state_dict()``: ``q/k/v/o_proj``, the SwiGLU
    ``gate/up/down_proj``), which its ``save_pretrained`` turns back into the Hub's."""
    sd = {_rename(k, _V2_MEMORY): v for k, v in sd.items()}
    for k in [k for k in sd if k.endswith(".mlp.gate_proj.weight") or k.endswith(".mlp.gate_proj.bias")]:
        pre, _, leaf = k.rpartition(".mlp.gate_proj.")
        sd[f"{pre}.mlp.weights_in.{leaf}"] = torch.cat([sd.pop(k), sd.pop(f"{pre}.mlp.up_proj.{leaf}")])
    for i in sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.attention\.", k))}):
        pre = f"encoder.layer.{i}.attention."
        names = "q_proj k_proj v_proj" if pre + "q_proj.weight" in sd else "attention.query attention.key attention.value"
        _stack_qkv(sd, pre, names, f"blocks.{i}.attn.")
    return {_rename(k, _V2_RENAMES): v for k, v in sd.items()}


_V3_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"), (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.w1."),
    (r"^layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.UP."),
    (r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.DOWN."),
    (r"^layer\.(\d+)\.", r"blocks.\1."),
)


def rope_periods(config: Mapping[str, Any]) -> torch.Tensor:
    """DINOv3's RoPE periods as transformers computes them (``1 / inv_freq``), ``head_dim / 4`` values."""
    head_dim = int(config.get("hidden_size", 384)) // int(config.get("num_attention_heads", 6))
    base = float(config.get("rope_theta", 100.0))
    return base ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)


def dinov3_to_official(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """``DINOv3ViTModel`` -> official DINOv3 (``config``: the folder's ``config.json``, may be empty)."""
    sd = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in sd.items()}
    gated = any(re.match(r"layer\.\d+\.mlp\.gate_proj\.", k) for k in sd)
    for i in sorted({int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.attention\.q_proj\.", k))}):
        _stack_qkv(sd, f"layer.{i}.attention.", "q_proj k_proj v_proj", f"blocks.{i}.attn.")
    up, down = ("w2", "w3") if gated else ("fc1", "fc2")
    out = {_rename(k, _V3_RENAMES).replace(".mlp.UP.", f".mlp.{up}.").replace(".mlp.DOWN.", f".mlp.{down}."): v
           for k, v in sd.items()}
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    out["rope_embed.periods"] = rope_periods(config)
    return out
