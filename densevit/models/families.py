"""Block families: how densevit runs one family of ViT blocks and embeds its positions.

A family adapter says, for the blocks of one model family, what the query / key / value projections are, how
positions enter (a learned embedding added once, or rotary embeddings in every attention) and how the block's
residual branches are combined. The extractor runs every block through its family's adapter, so facets
(q / k / v before and after RoPE, attention, tokens) come from one code path for all backbones. Adding a family
(say RADIO, SigLIP 2 or EVA-02) is one adapter here and one registry entry in :mod:`densevit.models.registry`.

Shapes: tokens ``B x N x C`` (``N = prefix + h*w``: CLS, registers, then patch tokens row-major); q / k / v
``B x heads x N x head_dim``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DensevitError
from .posenc import PosEncoding, resample_pos_embed, rope_coords, rope_rotate, rope_sincos

Grid = Tuple[int, int]
SinCos = Tuple[torch.Tensor, torch.Tensor]


class BlockFamily:
    """Base adapter: timm ``VisionTransformer`` blocks (``Block`` + ``Attention``, fused qkv, ``ls1``/``ls2``)."""

    block_types: Tuple[str, ...] = ("Block",)
    attn_types: Tuple[str, ...] = ("Attention",)
    # Feed-forwards run as the block's own module: timm's Mlp, and the SwiGLU ones of DINOv2 ViT-g (GluMlp,
    # timm's SwiGLUPacked: fused w12) and DINOv3 ViT-H+ / 7B (SwiGLU: separate gate / value projections).
    mlp_types: Tuple[str, ...] = ("Mlp", "GluMlp", "SwiGLU")

    def __init__(self, model: nn.Module, pos: PosEncoding, patch_size: int, stride: int) -> None:
        self.model = model
        self.pos = pos
        self.patch_size = patch_size
        self.stride = stride
        self._pos_cache: Dict[tuple, torch.Tensor] = {}
        for blk in model.blocks:
            self.check(blk)

    # ---------------------------------------------------------------- structure
    def check(self, blk: nn.Module) -> None:
        """Raise if ``blk`` is not a block this adapter knows how to run exactly."""
        if type(blk).__name__ not in self.block_types or type(blk.attn).__name__ not in self.attn_types \
                or getattr(blk.attn, "gate", None) is not None or type(blk.mlp).__name__ not in self.mlp_types:
            raise DensevitError(f"unsupported block type {type(blk).__name__}/{type(blk.attn).__name__}/"
                                f"{type(blk.mlp).__name__} for the {type(self).__name__} adapter")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    # ---------------------------------------------------------------- embedding
    def prefix_tokens(self, batch: int) -> list:
        m = self.model
        out = []
        if getattr(m, "cls_token", None) is not None:
            out.append(m.cls_token.expand(batch, -1, -1))
        if getattr(m, "reg_token", None) is not None:
            out.append(m.reg_token.expand(batch, -1, -1))
        return out

    def embed(self, x: torch.Tensor, stride: Optional[int] = None) -> Tuple[torch.Tensor, Grid, Optional[SinCos]]:
        """``B x 3 x H x W`` -> tokens ``B x N x C``, the token grid ``(h, w)`` and the RoPE ``(sin, cos)`` or None,
        the patch embedding run at ``stride`` (default :attr:`stride`) without changing the model."""
        m = self.model
        s = self.stride if stride is None else int(stride)
        proj = m.patch_embed.proj
        feat = F.conv2d(x, proj.weight, proj.bias, stride=s)             # B x C x h x w
        grid_hw = (feat.shape[-2], feat.shape[-1])
        tokens = m.patch_embed.norm(feat.flatten(2).transpose(1, 2))   # B x T x C
        prefix = self.prefix_tokens(tokens.shape[0])
        rope = None
        if self.pos.kind == "rope":
            tokens = torch.cat(prefix + [tokens], dim=1)
            rope = self.rope(tuple(x.shape[-2:]), x.device, s)
        else:
            pos = self.learned_pos(grid_hw).to(tokens.dtype)
            if getattr(m, "no_embed_class", False):                 # prefix tokens carry no position
                tokens = torch.cat(prefix + [tokens + pos], dim=1)
            else:
                tokens = torch.cat(prefix + [tokens], dim=1) + pos
        return m.norm_pre(m.pos_drop(tokens)), grid_hw, rope

    def learned_pos(self, grid_hw: Grid) -> torch.Tensor:
        """The model's position embedding (prefix entries, then the patch grid resampled to ``grid_hw``), float32.

        Read from ``model.pos_embed`` when used (cached per grid while that tensor is unchanged), so weights
        loaded into the model later are always honoured."""
        p = self.model.pos_embed
        key = (tuple(grid_hw), id(p), p._version, p.device)
        pos = self._pos_cache.get(key)
        if pos is None:
            n_prefix = 0 if getattr(self.model, "no_embed_class", False) else self.num_prefix_tokens
            full = p.detach().float()
            patch = resample_pos_embed(full[:, n_prefix:], grid_hw, self.pos)
            pos = torch.cat([full[:, :n_prefix], patch.float()], dim=1)
            self._pos_cache = {key: pos}          # one grid kept: batches are usually of one size
        return pos

    def rope(self, input_hw: Grid, device: torch.device, stride: Optional[int] = None) -> SinCos:
        raise DensevitError(f"{type(self).__name__} has no rotary position embedding")

    # ---------------------------------------------------------------- block
    def qkv(self, blk: nn.Module, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-rotated ``q, k, v`` (each ``B x heads x N x d``) of the normalised tokens ``h``."""
        attn = blk.attn
        B, N, _ = h.shape
        qkv = self.qkv_linear(attn, h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def qkv_linear(self, attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return attn.qkv(h)

    def position(self, q: torch.Tensor, k: torch.Tensor, rope: Optional[SinCos]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys as the attention uses them (rotated by RoPE where the family has it)."""
        if rope is None:
            return q, k
        P = self.num_prefix_tokens
        return rope_rotate(q, rope, P), rope_rotate(k, rope, P)

    def attn_out(self, blk: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """Attention output ``B x heads x N x d`` -> projected ``B x N x C``."""
        B, H, N, d = y.shape
        return blk.attn.proj(blk.attn.norm(y.transpose(1, 2).reshape(B, N, H * d)))

    def residual(self, blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Both residual branches: ``x + ls1(attn_out)``, then ``+ ls2(mlp(norm2(.)))``."""
        x = x + blk.drop_path1(blk.ls1(attn_out))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def scale(self, blk: nn.Module) -> float:
        return float(blk.attn.scale)

    # ---------------------------------------------------------------- moving the model
    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.model.to(device=device, dtype=dtype)
        self._pos_cache = {}


class EvaFamily(BlockFamily):
    """timm ``Eva`` blocks (DINOv3): fused qkv weight with separate q / v biases (the key bias is zero), layer
    scale as ``gamma_1`` / ``gamma_2``, rotary positions from the model's ``rope.periods``."""

    block_types = ("EvaBlock",)
    attn_types = ("EvaAttention",)

    def check(self, blk: nn.Module) -> None:
        super().check(blk)
        if blk.attn.qkv is None:
            raise DensevitError("unfused q/k/v projections are not supported by the EvaFamily adapter")

    def qkv_linear(self, attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if attn.q_bias is None:
            return attn.qkv(h)
        return F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))

    def residual(self, blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        if blk.gamma_1 is not None:
            attn_out = blk.gamma_1 * attn_out
        x = x + blk.drop_path1(attn_out)
        mlp = blk.mlp(blk.norm2(x))
        if blk.gamma_2 is not None:
            mlp = blk.gamma_2 * mlp
        return x + blk.drop_path2(mlp)

    def rope(self, input_hw: Grid, device: torch.device, stride: Optional[int] = None) -> SinCos:
        s = self.stride if stride is None else int(stride)
        coords = rope_coords(input_hw, self.patch_size, s, self.pos.normalize, device=device)
        return rope_sincos(coords, self.model.rope.periods.to(device))

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        # timm rebuilds RoPE periods from the base when a cast lowers their precision; keep the loaded ones.
        periods = self.model.rope.periods.detach().float().clone()
        super().to(device, dtype)
        self.model.rope.periods = periods.to(device)


FAMILIES: Dict[str, Type[BlockFamily]] = {"vit": BlockFamily, "eva": EvaFamily}


def make_adapter(family: str, model: nn.Module, pos: PosEncoding, patch_size: int, stride: int) -> BlockFamily:
    """The adapter of ``family`` (a key of :data:`FAMILIES`) bound to ``model``."""
    try:
        cls = FAMILIES[family]
    except KeyError:
        raise DensevitError(f"unknown block family {family!r}; known: {', '.join(FAMILIES)}") from None
    return cls(model, pos, patch_size, stride)
