"""Linear and Conv2d layers inside a flat parameter vector: discovery, forward hooks and unfolding.

Both per-layer computations of the package start here: EK-FAC fitting (``precompute.ekfac``) and the
one-forward-one-backward scoring pass (``precompute.layer_scores``). A layer's per-example weight
gradient is Σ_positions δ aᵀ [out, d_w], with δ the gradient at the layer's output and a its input
at that position; for Conv2d, a is the unfolded patch (``F.unfold``: in·kh·kw entries, ordered like
``weight.reshape(out, -1)``), so a convolution is a Linear layer applied at L positions.

A layer is *supported* when it is an nn.Linear, or an nn.Conv2d with one group and zero padding given
by numbers (the unfolding above is then exact). Its weight and bias must both sit in the vector;
every other parameter is reported as a fallback entry (EK-FAC models it by a diagonal, the scoring
pass then takes the generic path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .task import ParamLayout, TwoStageTask

Root = tuple[str, nn.Module, ParamLayout]
"""(name, module, layout): a module whose parameters fill the next ``layout.size`` entries of a flat vector."""


def pretrain_roots(task: TwoStageTask) -> list[Root]:
    """The modules of p = (θ, W), in the vector's order."""
    return [("theta", task.embedding, task.theta_layout), ("pretrain_head", task.pretrain_head, task.w_layout)]


def finetune_roots(task: TwoStageTask) -> list[Root]:
    """The modules of q = (θ, U), in the vector's order."""
    return [("theta", task.embedding, task.theta_layout), ("finetune_head", task.finetune_head, task.u_layout)]


@dataclass(frozen=True)
class LayerBlock:
    """One supported layer whose weight (and bias) sit in the flat vector."""

    name: str                    # parameter prefix, e.g. "theta:0" (root and module name)
    module: nn.Module
    weight: slice                # [out · d_w] entries, row-major like ``module.weight.reshape(out, -1)``
    bias: slice | None
    out_features: int
    d_w: int                     # in (Linear) or in·kh·kw (Conv2d)

    @property
    def d_in(self) -> int:
        """Columns of the layer's input rows with the bias appended as a last column of ones."""
        return self.d_w + (self.bias is not None)

    @property
    def kind(self) -> str:
        return "conv2d" if isinstance(self.module, nn.Conv2d) else "linear"


def supported(module: nn.Module | None) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def find_layers(roots: list[Root]) -> tuple[list[LayerBlock], list[tuple[str, slice]]]:
    """The supported layers of the roots, laid out one after another in a flat vector, and the
    (name, slice) of every other parameter (fallback entries), in vector order."""
    found: dict[int, dict] = {}
    fallback: list[tuple[str, slice]] = []
    offset = 0
    for root_name, root, layout in roots:
        modules = dict(root.named_modules())
        for name, size in zip(layout.names, layout.sizes):
            owner, _, kind = name.rpartition(".")
            module = modules.get(owner)
            span = slice(offset, offset + size)
            offset += size
            if supported(module) and kind in ("weight", "bias"):
                label = f"{root_name}:{owner}" if owner else root_name
                entry = found.setdefault(id(module), {"name": label, "module": module, "bias": None})
                entry[kind] = span
            else:
                fallback.append((f"{root_name}:{name}", span))
    blocks = []
    for entry in found.values():
        module = entry["module"]
        if "weight" not in entry:           # a bias without its weight in the vector: fallback
            fallback.append((entry["name"] + ".bias", entry["bias"]))
            continue
        blocks.append(LayerBlock(entry["name"], module, entry["weight"], entry["bias"], module.weight.shape[0],
                                 module.weight[0].numel()))
    return blocks, fallback


class LayerRecorder:
    """Forward hooks that keep each block's (input, output) for every call during the ``with`` block.

    ``calls[id(module)]`` lists one pair per call: a layer that ran more than once per forward pass
    sums its gradient over the calls, which the per-layer formulas above do not model."""

    def __init__(self, blocks: list[LayerBlock]):
        self.blocks = blocks
        self.calls: dict[int, list[tuple[Tensor, Tensor]]] = {id(b.module): [] for b in blocks}

    def __enter__(self) -> "LayerRecorder":
        def record(module, inputs, output):
            self.calls[id(module)].append((inputs[0], output))
        self.handles = [b.module.register_forward_hook(record) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def reused(self) -> list[str]:
        """Names of the blocks that ran other than exactly once."""
        return [b.name for b in self.blocks if len(self.calls[id(b.module)]) != 1]

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(input, output) of each block's single call, in block order."""
        return [self.calls[id(b.module)][0] for b in self.blocks]


def input_rows(module: nn.Module, a: Tensor) -> Tensor:
    """A layer's input -> [B, L, d_w]: the rows whose outer products with δ give the weight gradient
    (Conv2d: the unfolded patches; Linear: positions are the extra leading dimensions, L = 1 for [B, in])."""
    if isinstance(module, nn.Conv2d):
        return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride).transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def output_rows(module: nn.Module, d: Tensor) -> Tensor:
    """A gradient at the layer's output -> [B, L, out], positions in ``input_rows``' order."""
    if isinstance(module, nn.Conv2d):
        return d.reshape(d.shape[0], d.shape[1], -1).transpose(1, 2)
    return d.reshape(d.shape[0], -1, d.shape[-1])


__all__ = ["LayerBlock", "LayerRecorder", "Root", "find_layers", "finetune_roots", "input_rows", "output_rows",
           "pretrain_roots", "supported"]
