"""Attention over packed rows whose cost follows the examples, not the row.

A packed row holds several examples, and each may attend only to itself (see ``data``). The
models' own attention computes the whole row's ``L x L`` scores and masks most of them away:
transformers' MPT is eager only, and SDPA with a dense mask still does the full product. Two
exact replacements, chosen by ``attn_impl``:

- ``sdpa``: one fused ``scaled_dot_product_attention`` call per example, causal within it, so the
  work is the sum of the examples' squared lengths. Runs anywhere, training included.
- ``flex``: FlexAttention with a block mask built once per batch from the segment ids (blocks
  between two examples are skipped, not computed) and ALiBi as a score modification; compiled.
  Its backward pass needs a GPU, and its kernels need more shared memory than the A10G, L4 and
  L40S have (``contract.FLEX_SHARED_MEMORY``): ``auto`` takes it on A100, H100 and H200.

Padding (segment 0) attends to nothing and its output is zero; it never reaches a loss, so losses
and gradients equal the eager path's, and so do the logits of every real token (in fp32 to
rounding; in bf16, ``sdpa`` adds MPT's ALiBi bias rounded to bf16, where eager adds it in fp32:
within bf16's own error, tested; ``flex`` computes it in fp32).

How the replacement gets in, without forking a modeling file:

- MPT (``MptAttention``, ALiBi): each attention module's ``forward`` is replaced on the instance by
  ``_mpt_forward``, which keeps MPT's own projections, ``clip_qkv``, scale and dropout and only
  swaps the score/softmax/context step. The batch's layout reaches it through the ``PackedAttention``
  the module holds (MPT's blocks pass no extra arguments down).
- Models on transformers' attention interface (the Llama family, RoPE): a registered attention
  function (``ftstack_packed``) with a mask function that builds no mask; the layout travels as a
  keyword argument of the model's forward, which transformers passes down to the attention call.

Only model types checked against the eager path in the tests take these paths (``VERIFIED``):
others may change the attention (sliding windows, soft-capping) in ways a plain causal kernel
would silently get wrong.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .contract import VERIFIED_MODEL_TYPES as VERIFIED
from .contract import flex_fits
from .errors import ConfigError

IMPLEMENTATION = "ftstack_packed"
"""The name under which the packed attention is registered with transformers."""

LAYOUT_KWARG = "ftstack_layout"
"""The keyword argument that carries a batch's layout down to the registered attention function."""



def resolve_attn_impl(requested: str, device: torch.device, model_type: str, dropout: float = 0.0) -> str:
    """The attention path a run takes: ``auto`` picks the fastest exact one for the device and
    model (``flex`` on a GPU whose shared memory holds its kernels, ``sdpa`` on others and on CPU,
    ``eager`` for unverified model types). An explicit choice the device or model cannot train
    with is a ConfigError; ``flex`` asked for on a GPU of less shared memory is tried all the same."""
    fused = model_type in VERIFIED
    flex_ok = device.type == "cuda" and dropout == 0.0 and _has_flex()
    if requested == "auto":
        return "eager" if not fused else "flex" if flex_ok and _flex_fits(device) else "sdpa"
    if requested in ("sdpa", "flex") and not fused:
        raise ConfigError(
            f"attn_impl: {requested} is verified for {', '.join(VERIFIED)} models only, not {model_type!r}; use auto or eager"
        )
    if requested == "flex" and not flex_ok:
        why = "has no backward pass on CPU" if device.type != "cuda" else (
            "does not apply attention dropout" if dropout else "is not in this torch build")
        raise ConfigError(f"attn_impl: FlexAttention {why}; use auto or sdpa")
    return requested


def attention_dropout(config) -> float:
    """The attention dropout probability of a model config (MPT keeps it in ``attn_config``)."""
    if config.model_type == "mpt":
        return float(config.attn_config.attn_pdrop or 0.0)
    return float(getattr(config, "attention_dropout", 0.0) or 0.0)


def _flex_fits(device: torch.device) -> bool:
    """Whether FlexAttention's compiled kernels fit the GPU's shared memory (``contract.flex_fits``)."""
    properties = torch.cuda.get_device_properties(device)
    return flex_fits(getattr(properties, "shared_memory_per_block_optin", 0))


def _has_flex() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Layout:
    """Where a batch's examples lie: ``spans[b]`` lists each example's ``(start, end)`` in row
    ``b``. Built once per batch and shared by every layer."""

    segment_ids: torch.Tensor
    spans: list[list[tuple[int, int]]]
    block_mask: Any = None
    _biases: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, segment_ids: torch.Tensor, flex: bool, device: torch.device | None = None) -> Layout:
        """The layout of a (batch, seq) tensor of segment ids (0 is padding), for ``device``
        (default: the ids'). Give the ids on the CPU, where the batch is made: the spans are read
        there, without waiting on the device."""
        spans = [_spans(row) for row in segment_ids.cpu().tolist()]
        segment_ids = segment_ids.to(device or segment_ids.device)
        layout = cls(segment_ids, spans)
        if flex:
            layout.block_mask = _block_mask(segment_ids)
        return layout

    def alibi(self, slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        """ALiBi with the causal mask folded in, for one example of ``length`` tokens: (1, heads,
        length, length), 4-D because SDPA's fused CPU kernel takes no other mask shape. MPT adds
        ``slope x (key - last)``; softmax ignores a constant per query, so ``slope x (key -
        query)`` within the example is the same attention. It depends on the positions only, so
        one bias for the batch's longest example serves every example (its top-left corner):
        heads x longest^2 elements per batch, not that per distinct length."""
        if self._biases.get(dtype) is None:
            longest = max((end - start for spans in self.spans for start, end in spans), default=length)
            pos = torch.arange(max(longest, length), device=slopes.device)
            distance = (pos[None, :] - pos[:, None]).to(torch.float32)
            bias = slopes.float()[:, None, None] * distance
            self._biases[dtype] = bias.masked_fill(distance > 0, float("-inf")).to(dtype)[None]
        return self._biases[dtype][:, :, :length, :length]


def _spans(row: list[int]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or row[t] != row[start]:
            if row[start] != 0:
                spans.append((start, t))
            start = t
    return spans


def _block_mask(segment_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q, kv):
        return (segment_ids[b, q] == segment_ids[b, kv]) & (q >= kv) & (segment_ids[b, q] > 0)

    batch, seq = segment_ids.shape
    return create_block_mask(document_causal, batch, None, seq, seq, device=segment_ids.device)


def packed_sdpa(q, k, v, layout: Layout, scale: float, slopes: torch.Tensor | None = None, dropout: float = 0.0):
    """Attention of (batch, heads, seq, dim) tensors, one fused call per example. ``k`` and ``v``
    may have fewer heads (grouped-query attention)."""
    heads, seq = q.shape[1], q.shape[2]
    gqa = k.shape[1] != heads
    if not any(layout.spans):
        # No example at all (an empty micro batch at the end of an epoch): zeros, still joined to
        # q, k and v, so that every parameter gets its zero gradient as on the other ranks, whose
        # FSDP reduce-scatters expect one.
        return q * 0 + (k.sum() + v.sum()) * 0
    rows = []
    # split, not indexing: its backward pass is one cat, where each slice's backward would
    # write a zero tensor the size of the whole batch.
    for spans, q_row, k_row, v_row in zip(layout.spans, q.split(1), k.split(1), v.split(1)):
        pieces = _pieces(spans, seq)
        sizes = [end - start for start, end, _ in pieces]
        out = []
        for (start, end, example), q_p, k_p, v_p in zip(pieces, q_row.split(sizes, 2), k_row.split(sizes, 2), v_row.split(sizes, 2)):
            if not example:
                out.append(q_p.new_zeros(q_p.shape))
                continue
            bias = None if slopes is None else layout.alibi(slopes, end - start, q.dtype)
            out.append(F.scaled_dot_product_attention(
                q_p, k_p, v_p, attn_mask=bias, dropout_p=dropout, is_causal=bias is None, scale=scale, enable_gqa=gqa
            ))
        rows.append(torch.cat(out, dim=2))
    return torch.cat(rows)


def _pieces(spans: list[tuple[int, int]], seq: int) -> list[tuple[int, int, bool]]:
    """The row cut into examples and the gaps between them: (start, end, is_example)."""
    pieces, cursor = [], 0
    for start, end in spans:
        if start > cursor:
            pieces.append((cursor, start, False))
        pieces.append((start, end, True))
        cursor = end
    if cursor < seq:
        pieces.append((cursor, seq, False))
    return pieces


_COMPILED_FLEX = None


def packed_flex(q, k, v, layout: Layout, scale: float, score_mod=None):
    """FlexAttention over the layout's block mask, with ``score_mod`` (ALiBi); compiled on first
    use, once per shape (the block mask and score functions of later batches are new closures of
    the same code, which the compiled kernel takes without compiling again)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _COMPILED_FLEX is None:
        # Uncompiled, FlexAttention materializes the scores: no gain, so compile even on CPU.
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX(
        q, k, v, score_mod=score_mod, block_mask=layout.block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


class PackedAttention:
    """Installed on a model by ``use_packed_attention``; ``prepare`` builds each batch's layout
    and returns the keyword arguments its forward needs."""

    def __init__(self, impl: str, mpt_slopes: torch.Tensor | None) -> None:
        self.impl = impl
        self.layout: Layout | None = None
        self.mpt_slopes = mpt_slopes
        self._alibi: tuple[torch.Tensor, Any] | None = None

    def prepare(self, segment_ids: torch.Tensor, device: torch.device | None = None) -> dict[str, Any]:
        """Builds the batch's layout (see ``Layout.build``). It stays current until the next
        batch: activation checkpointing runs the attention again in the backward pass, after the
        forward returned."""
        self.layout = Layout.build(segment_ids, self.impl == "flex", device)
        segment_ids = self.layout.segment_ids
        if self.mpt_slopes is None:
            return {LAYOUT_KWARG: self.layout}
        # MptModel builds a (batch, 1, seq, seq) causal mask unless it is handed a 4-D one; the
        # packed forward never reads it, so it gets a stand-in of one element per row.
        return {"attention_mask": segment_ids.new_zeros((segment_ids.shape[0], 1, 1, 1), dtype=torch.bool)}

    def attend_mpt(self, q, k, v, scale: float, dropout: float = 0.0):
        """MPT's (batch, heads, seq, dim) context through the chosen kernel, with its ALiBi."""
        slopes, score_mod = self._alibi_on(q.device)
        if self.impl == "flex":
            return packed_flex(q, k, v, self.layout, scale, score_mod)
        return packed_sdpa(q, k, v, self.layout, scale, slopes, dropout)

    def _alibi_on(self, device: torch.device):
        """The ALiBi slopes on ``device`` and FlexAttention's score modification over them, made
        once per device rather than copied to it in every layer."""
        if self._alibi is None or self._alibi[0].device != device:
            slopes = self.mpt_slopes.to(device)

            def alibi(score, b, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)

            self._alibi = (slopes, alibi)
        return self._alibi


def use_packed_attention(model: torch.nn.Module, impl: str) -> PackedAttention | None:
    """Routes the model's attention through ``impl`` (``sdpa`` or ``flex``); None for ``eager``,
    which leaves the model as loaded. Call it on every rank, before or after sharding (it patches
    modules in place and registers no parameters)."""
    if impl == "eager":
        return None
    if model.config.model_type == "mpt":
        from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

        layers = [m for m in model.modules() if isinstance(m, MptAttention)]
        n_heads = model.config.n_heads
        # The slopes are the per-head factors of MPT's own ALiBi tensor (its last key is 1 behind).
        slopes = -build_mpt_alibi_tensor(n_heads, 2)[:, 0, 0].float()
        packed = PackedAttention(impl, slopes)
        for layer in layers:
            layer.ftstack_packed = packed
            layer.forward = types.MethodType(_mpt_forward, layer)
        return packed
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    return PackedAttention(impl, None)


def _mpt_forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
    """``MptAttention.forward`` with the packed kernel in place of the masked score matrix. With
    a cache (generation) or outside a prepared batch it is MPT's own forward."""
    packed: PackedAttention = self.ftstack_packed
    if cache is not None or packed.layout is None:
        return type(self).forward(self, hidden_states, position_bias, cache=cache, attention_mask=attention_mask, **kwargs)
    batch, seq = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(batch, seq, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    dropout = self.attn_dropout_p if self.training else 0.0
    context = packed.attend_mpt(q, k, v, self.softmax_scale, dropout)
    return self.out_proj(context.transpose(1, 2).reshape(batch, seq, -1)), None


def _interface_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered with transformers: (batch, seq, heads, dim) out."""
    layout: Layout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise RuntimeError(f"{IMPLEMENTATION} attention called without {LAYOUT_KWARG}; call PackedAttention.prepare first")
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    if layout.block_mask is not None:
        out = packed_flex(query, key, value, layout, scale)
    else:
        out = packed_sdpa(query, key, value, layout, scale, dropout=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the layout is the mask


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _interface_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)
