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

``layer_slots`` returns None (use the generic jvp / vmap(grad) paths) unless every pretraining
parameter is the weight or bias of a Linear or an ungrouped, zero-padded Conv2d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .task import TwoStageTask

MAX_ELEMENTS = 1 << 24      # per-layer per-example gradient block: at most this many numbers at a time


@dataclass(frozen=True)
class LayerSlot:
    """One Linear/Conv2d of the pretraining model and where its parameters sit in p."""

    module: nn.Module
    weight: slice               # [out · d] entries of p, ordered like ``module.weight.reshape(out, -1)``
    bias: slice | None


def _supported(module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def layer_slots(task: TwoStageTask) -> list[LayerSlot] | None:
    """The Linear/Conv2d layers holding every pretraining parameter, or None."""
    slots: dict[int, dict] = {}
    offset = 0
    for root, layout in ((task.embedding, task.theta_layout), (task.pretrain_head, task.w_layout)):
        modules = dict(root.named_modules())
        for name, size in zip(layout.names, layout.sizes):
            owner, _, kind = name.rpartition(".")
            module = modules.get(owner)
            if not _supported(module) or kind not in ("weight", "bias"):
                return None
            slots.setdefault(id(module), {"module": module, "bias": None})[kind] = slice(offset, offset + size)
            offset += size
    if any("weight" not in s for s in slots.values()):
        return None
    return [LayerSlot(**entry) for entry in slots.values()]


def layer_scores(task: TwoStageTask, p: Tensor, x: Tensor, y: Tensor, vectors: Tensor,
                 slots: list[LayerSlot]) -> Tensor | None:
    """∇_p ℓ_P(z_i) · vectors[:, t] for a chunk, [B, T]; None if a layer runs other than once."""
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {id(s.module): [] for s in slots}

    def record(module, inputs, output):
        seen[id(module)].append((inputs[0], output))

    handles = [s.module.register_forward_hook(record) for s in slots]
    try:
        with torch.enable_grad():
            leaf = p.detach().requires_grad_(True)
            total = task.pretrain_losses(leaf, x, y).sum()
            calls = [seen[id(s.module)] for s in slots]
            if any(len(c) != 1 for c in calls):
                return None
            deltas = torch.autograd.grad(total, [c[0][1] for c in calls])
    finally:
        for handle in handles:
            handle.remove()
    b, t = len(x), vectors.shape[1]
    out = torch.zeros(b, t, dtype=vectors.dtype, device=vectors.device)
    for slot, call, delta in zip(slots, calls, deltas):
        a = call[0][0].detach()
        n_out = slot.module.weight.shape[0]
        block = vectors[slot.weight].reshape(n_out, -1, t)                          # [out, d, T]
        if isinstance(slot.module, nn.Linear) and a.dim() == 2:
            out += _single_position(a, delta, block)
        else:
            out += _many_positions(slot.module, a, delta, block)
        if slot.bias is not None:                                                   # Σ over positions of δ
            summed = delta.reshape(b, n_out, -1).sum(-1) if isinstance(slot.module, nn.Conv2d) \
                else delta.reshape(b, -1, n_out).sum(1)
            out += summed @ vectors[slot.bias]
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
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)                                 # [B, d, L]
        grads_out = delta.reshape(len(a), n_out, -1)                            # [B, out, L]
    else:
        patches = a.reshape(len(a), -1, d).transpose(1, 2)
        grads_out = delta.reshape(len(a), -1, n_out).transpose(1, 2)
    flat = block.reshape(n_out * d, t)
    step = max(1, MAX_ELEMENTS // (n_out * d))
    parts = []
    for s in range(0, len(a), step):
        g = torch.bmm(grads_out[s: s + step], patches[s: s + step].transpose(1, 2))      # [b, out, d]
        parts.append(g.reshape(len(g), -1) @ flat)
    return torch.cat(parts)


__all__ = ["LayerSlot", "MAX_ELEMENTS", "layer_scores", "layer_slots"]
