"""Per-example scores ∇ℓ_P(z_i) · S for nn.Linear and nn.Conv2d models, from one forward and one backward.

A layer's per-example weight gradient is Σ_positions δ aᵀ: δ the gradient of the summed loss with
respect to the layer's output at that position (examples do not interact, so one backward of Σ_i ℓ_i
gives every example's δ), a the layer's input there (for Conv2d, the unfolded patch,
``F.unfold``: in·kh·kw entries, ordered like ``weight.reshape(out, -1)``). The bias gradient is Σ δ.

- Linear with [B, in] inputs (one position): δ_iᵀ S_t a_i for all T blocks S_t [out, in] in one
  GEMM that contracts the wider side first: B·T·out·in multiply-adds.
- Conv2d (and Linear over extra dims): the layer's per-example weight gradient G_i = δ_iᵀ A_i
  [out, in·kh·kw] is assembled with one batched matrix product over positions (B·L·out·d), then
  contracted with all T blocks at once (B·out·d·T); per-example gradients of the whole model are
  never formed, and the chunk is split so that G holds at most ``MAX_ELEMENTS`` numbers.

Layers are found, hooked and unfolded by ``precompute.layers`` (shared with EK-FAC). ``layer_slots``
returns None (use the generic jvp / vmap(grad) paths) unless every pretraining parameter is the
weight or bias of a supported layer (a Linear, or an ungrouped, zero-padded Conv2d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import LayerBlock, LayerRecorder, find_layers, input_rows, output_rows, pretrain_roots
from .task import TwoStageTask

MAX_ELEMENTS = 1 << 24      # per-layer per-example gradient block: at most this many numbers at a time


def layer_slots(task: TwoStageTask) -> list[LayerBlock] | None:
    """The supported layers holding every pretraining parameter (``layers.find_layers``), or None
    when any parameter lies outside them."""
    blocks, fallback = find_layers(pretrain_roots(task))
    return None if fallback else blocks


def layer_scores(task: TwoStageTask, p: Tensor, x: Tensor, y: Tensor, vectors: Tensor,
                 slots: list[LayerBlock]) -> Tensor | None:
    """∇_p ℓ_P(z_i) · vectors[:, t] for a chunk, [B, T]; None if a layer runs other than once."""
    with LayerRecorder(slots) as rec, torch.enable_grad():
        leaf = p.detach().requires_grad_(True)
        total = task.pretrain_losses(leaf, x, y).sum()
    if rec.reused():
        return None
    calls = rec.pairs()
    deltas = torch.autograd.grad(total, [out for _, out in calls])
    b, t = len(x), vectors.shape[1]
    out = torch.zeros(b, t, dtype=vectors.dtype, device=vectors.device)
    for slot, (a, _), delta in zip(slots, calls, deltas):
        a = a.detach()
        block = vectors[slot.weight].reshape(slot.out_features, -1, t)               # [out, d, T]
        if isinstance(slot.module, nn.Linear) and a.dim() == 2:
            out += _single_position(a, delta, block)
        else:
            out += _many_positions(slot.module, a, delta, block)
        if slot.bias is not None:                                                   # Σ over positions of δ
            out += output_rows(slot.module, delta).sum(1) @ vectors[slot.bias]
    return out


def _single_position(a: Tensor, delta: Tensor, block: Tensor) -> Tensor:
    """δ_iᵀ S_t a_i for [B, in] inputs: one GEMM contracting the wider side, then a batched dot."""
    n_out, n_in, t = block.shape
    b = len(a)
    if n_in >= n_out:
        projected = (a @ block.permute(1, 0, 2).reshape(n_in, n_out * t)).view(b, n_out, t)
        return torch.bmm(delta[:, None, :], projected)[:, 0]
    projected = (delta @ block.reshape(n_out, n_in * t)).view(b, n_in, t)
    return torch.bmm(a[:, None, :], projected)[:, 0]


def _many_positions(module: nn.Module, a: Tensor, delta: Tensor, block: Tensor) -> Tensor:
    """Σ_l δ_ilᵀ S_t a_il: per-example layer gradient G_i = δ_iᵀ A_i [out, d], then G · S for all t."""
    n_out, d, t = block.shape
    patches = input_rows(module, a)                                              # [B, L, d]
    grads_out = output_rows(module, delta).transpose(1, 2)                       # [B, out, L]
    flat = block.reshape(n_out * d, t)
    step = max(1, MAX_ELEMENTS // (n_out * d))
    parts = []
    for s in range(0, len(a), step):
        g = torch.bmm(grads_out[s: s + step], patches[s: s + step])                      # [b, out, d]
        parts.append(g.reshape(len(g), -1) @ flat)
    return torch.cat(parts)


__all__ = ["MAX_ELEMENTS", "layer_scores", "layer_slots"]
