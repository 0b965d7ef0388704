"""The two-stage task: what a user fills in to trace a finetuned model back to its pretraining data.

A task holds three ``nn.Module``s — the shared embedding (θ), the pretraining head (W) and the
finetuning head (U) — the pretraining set, the finetuning training set, the finetune test set,
per-example losses and L2 coefficients. Everything downstream works on *flat* parameter vectors
and evaluates the modules functionally (``torch.func.functional_call``), so any module works.

Flat layouts (float vectors):
    pretraining  p = [θ; W]   length P = Pθ + PW
    finetuning   q = [θ; U]   length Q = Pθ + PU

Objectives (docs/design.md §2; the weights w_i default to 1 and removal sets w_z = 0 while the
denominator m stays fixed):
    L_P(p) = (1/m) Σ_i w_i ℓ_P(z_i; p) + (λ_P/2)‖p‖²
    L_F(q) = (1/n) Σ_j ℓ_F(x_j; q) + (λ_F/2)‖U‖² [+ (α/2)‖θ − θ*‖² in the "updated" scenario]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .config import DEFAULT_L2
from .errors import PrecomputeError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(outputs [B, ...], targets [B]) -> per-example losses [B]."""

Measurement = Callable[[Tensor, Tensor], Tensor]
"""(finetune outputs [T, ...], targets [T]) -> the value f(x_t) influence explains, [T]."""


class TaskError(PrecomputeError, ValueError):
    """A task was filled in wrongly (shapes, losses, ids); the message names the problem."""


def cross_entropy_per_example(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy, [B, C] x [B] -> [B] (nats)."""
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def correct_class_margin(logits: Tensor, targets: Tensor) -> Tensor:
    """A ``Measurement``: logit of the true class minus the largest other logit, [T, C] x [T] -> [T]."""
    true = logits.gather(1, targets[:, None])[:, 0]
    others = logits.masked_fill(nn.functional.one_hot(targets, logits.shape[1]).bool(), float("-inf"))
    return true - others.amax(1)


def class_log_probability(cls: int) -> Measurement:
    """A ``Measurement``: log p(cls | x_t) under the finetuned model (the targets are ignored)."""
    def measure(logits: Tensor, targets: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=1)[:, cls]
    return measure


class ParamLayout:
    """Maps a module's named parameters to a slice of a flat vector and back."""

    def __init__(self, module: nn.Module):
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.size = sum(self.sizes)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Flat [size] -> {name: tensor} (views, so gradients flow through)."""
        parts = torch.split(flat, self.sizes)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def flatten(self, params: dict[str, Tensor], what: str = "parameters") -> Tensor:
        """{name: tensor} -> flat [size]; raises TaskError naming any missing or misshapen entry."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise TaskError(f"{what}: missing {', '.join(missing)}")
        for n, s in zip(self.names, self.shapes):
            if tuple(params[n].shape) != s:
                raise TaskError(
                    f"{what}: {n} has shape {tuple(params[n].shape)}, the module expects {s}")
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def from_module(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@dataclass
class TwoStageTask:
    """A pretrain -> finetune chain and its data.

    embedding:     shared part, x -> features; its parameters are θ.
    pretrain_head: features -> pretraining outputs; parameters W.
    finetune_head: features -> finetuning outputs; parameters U.
    pretrain_x/y:  the m pretraining examples (inputs [m, ...], targets [m]).
    finetune_x/y:  the n finetuning training examples.
    test_x/y:      finetune test examples; influence is computed for chosen rows of these.
    pretrain_loss, finetune_loss: per-example losses (see ``LossFn``), cross-entropy by default.
    pretrain_l2:   λ_P on all of (θ, W).   finetune_l2: λ_F on U.   Default ``config.DEFAULT_L2``.
    measurement:   f(x_t), what influence explains (see ``Measurement``); None: the test loss
                   ℓ_F(x_t). Scores are always the predicted change of f if z is removed, so for
                   a measurement where higher is better (``correct_class_margin``,
                   ``class_log_probability``) a NEGATIVE score marks a helpful z.
    """

    embedding: nn.Module
    pretrain_head: nn.Module
    finetune_head: nn.Module
    pretrain_x: Tensor
    pretrain_y: Tensor
    finetune_x: Tensor
    finetune_y: Tensor
    test_x: Tensor
    test_y: Tensor
    pretrain_loss: LossFn = cross_entropy_per_example
    finetune_loss: LossFn = cross_entropy_per_example
    pretrain_l2: float = DEFAULT_L2
    finetune_l2: float = DEFAULT_L2
    measurement: Measurement | None = None
    theta_layout: ParamLayout = field(init=False)
    w_layout: ParamLayout = field(init=False)
    u_layout: ParamLayout = field(init=False)

    def __post_init__(self) -> None:
        self.theta_layout = ParamLayout(self.embedding)
        self.w_layout = ParamLayout(self.pretrain_head)
        self.u_layout = ParamLayout(self.finetune_head)
        for name, x, y in (("pretrain", self.pretrain_x, self.pretrain_y),
                           ("finetune", self.finetune_x, self.finetune_y),
                           ("test", self.test_x, self.test_y)):
            if len(x) != len(y):
                raise TaskError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)}")
            if len(x) == 0:
                raise TaskError(f"{name} set is empty")

    # ---- sizes and layouts -------------------------------------------------------------------
    @property
    def n_theta(self) -> int:
        return self.theta_layout.size

    @property
    def n_pretrain_params(self) -> int:
        """P = Pθ + PW."""
        return self.theta_layout.size + self.w_layout.size

    @property
    def n_finetune_params(self) -> int:
        """Q = Pθ + PU."""
        return self.theta_layout.size + self.u_layout.size

    @property
    def m(self) -> int:
        return len(self.pretrain_x)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.embedding.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.embedding.parameters()).device

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "TwoStageTask":
        """Moves modules and data; float inputs take ``dtype``, integer targets keep theirs."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        for mod in (self.embedding, self.pretrain_head, self.finetune_head):
            mod.to(device=device, dtype=dtype)
        for name in ("pretrain_x", "pretrain_y", "finetune_x", "finetune_y", "test_x", "test_y"):
            setattr(self, name, move(getattr(self, name)))
        return self

    # ---- flat parameter vectors ---------------------------------------------------------------
    def initial_pretrain_params(self) -> Tensor:
        """p0 = [θ; W] from the modules' current parameters."""
        return torch.cat([self.theta_layout.from_module(self.embedding),
                          self.w_layout.from_module(self.pretrain_head)])

    def initial_u(self) -> Tensor:
        return self.u_layout.from_module(self.finetune_head)

    def pretrain_params_from(self, theta: dict[str, Tensor], w: dict[str, Tensor]) -> Tensor:
        """p = [θ; W] from state dicts of trained modules (checks names and shapes)."""
        return torch.cat([self.theta_layout.flatten(theta, "embedding parameters"),
                          self.w_layout.flatten(w, "pretraining head parameters")])

    def finetune_params_from(self, theta: dict[str, Tensor], u: dict[str, Tensor]) -> Tensor:
        """q = [θ; U] from state dicts of trained modules (checks names and shapes)."""
        return torch.cat([self.theta_layout.flatten(theta, "embedding parameters"),
                          self.u_layout.flatten(u, "finetuning head parameters")])

    def theta_of(self, flat: Tensor) -> Tensor:
        """θ slice of a flat p or q."""
        return flat[..., : self.n_theta]

    # ---- functional forward passes ------------------------------------------------------------
    def features(self, theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.embedding, self.theta_layout.unflatten(theta), (x,))

    def pretrain_outputs(self, p: Tensor, x: Tensor) -> Tensor:
        theta, w = p[: self.n_theta], p[self.n_theta:]
        return functional_call(self.pretrain_head, self.w_layout.unflatten(w), (self.features(theta, x),))

    def finetune_outputs(self, q: Tensor, x: Tensor) -> Tensor:
        theta, u = q[: self.n_theta], q[self.n_theta:]
        return functional_call(self.finetune_head, self.u_layout.unflatten(u), (self.features(theta, x),))

    def pretrain_losses(self, p: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """ℓ_P per example, [B]."""
        return _checked_losses(self.pretrain_loss(self.pretrain_outputs(p, x), y), len(x), "pretrain_loss")

    def finetune_losses(self, q: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """ℓ_F per example, [B]."""
        return _checked_losses(self.finetune_loss(self.finetune_outputs(q, x), y), len(x), "finetune_loss")

    # ---- objectives ---------------------------------------------------------------------------
    def pretrain_objective(self, p: Tensor, weights: Tensor | None = None) -> Tensor:
        """L_P(p) with example weights w (default 1; the denominator stays m)."""
        losses = self.pretrain_losses(p, self.pretrain_x, self.pretrain_y)
        data = (losses if weights is None else weights * losses).sum() / self.m
        return data + 0.5 * self.pretrain_l2 * (p * p).sum()

    def finetune_objective(self, q: Tensor, anchor: Tensor | None = None, alpha: float = 0.0) -> Tensor:
        """L_F(q) [+ (α/2)‖θ − anchor‖²]."""
        losses = self.finetune_losses(q, self.finetune_x, self.finetune_y)
        u = q[self.n_theta:]
        value = losses.mean() + 0.5 * self.finetune_l2 * (u * u).sum()
        if anchor is not None and alpha > 0:
            d = q[: self.n_theta] - anchor
            value = value + 0.5 * alpha * (d * d).sum()
        return value

    def fixed_objective(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """u -> L_F([θ; u]) for a constant θ (the "fixed" scenario), with θ's features of the finetune set
        computed once: each value, gradient or Hessian product then costs a pass of the head alone."""
        with torch.no_grad():
            features = self.features(theta.detach(), self.finetune_x)

        def objective(u: Tensor) -> Tensor:
            logits = functional_call(self.finetune_head, self.u_layout.unflatten(u), (features,))
            losses = _checked_losses(self.finetune_loss(logits, self.finetune_y), len(features), "finetune_loss")
            return losses.mean() + 0.5 * self.finetune_l2 * (u * u).sum()

        return objective

    def test_loss(self, q: Tensor, test_ids: Tensor) -> Tensor:
        """f(x_t) = ℓ_F(x_t; q) for the given test rows, [T]."""
        return self.finetune_losses(q, self.test_x[test_ids], self.test_y[test_ids])

    def test_measurement(self, q: Tensor, test_ids: Tensor) -> Tensor:
        """f(x_t) for the given test rows, [T]: ``measurement`` if set, else the test loss."""
        if self.measurement is None:
            return self.test_loss(q, test_ids)
        x, y = self.test_x[test_ids], self.test_y[test_ids]
        return _checked_losses(self.measurement(self.finetune_outputs(q, x), y), len(x), "measurement")

    def check_test_ids(self, test_ids) -> Tensor:
        ids = torch.as_tensor(test_ids, dtype=torch.long).reshape(-1)
        n = len(self.test_x)
        bad = [int(i) for i in ids if not 0 <= int(i) < n]
        if bad:
            raise TaskError(f"test id(s) {bad} out of range: the finetune test set has {n} examples (ids 0..{n - 1})")
        if len(ids) == 0:
            raise TaskError("no test ids given")
        return ids.to(self.test_x.device)

    def validate(self, p: Tensor, q: Tensor | None = None) -> None:
        """Evaluates both losses on two examples to surface shape or value problems early."""
        if p.shape != (self.n_pretrain_params,):
            raise TaskError(f"pretraining parameters have shape {tuple(p.shape)}, expected ({self.n_pretrain_params},) = θ {self.n_theta} + W {self.w_layout.size}")
        self.pretrain_losses(p, self.pretrain_x[:2], self.pretrain_y[:2])
        if q is not None:
            if q.shape != (self.n_finetune_params,):
                raise TaskError(f"finetuning parameters have shape {tuple(q.shape)}, expected ({self.n_finetune_params},) = θ {self.n_theta} + U {self.u_layout.size}")
            self.finetune_losses(q, self.finetune_x[:2], self.finetune_y[:2])


def _checked_losses(losses: Tensor, batch: int, name: str) -> Tensor:
    if losses.shape != (batch,):
        raise TaskError(
            f"{name} must return one {'value' if name == 'measurement' else 'loss'} per example "
            f"(shape [{batch}]), got shape {tuple(losses.shape)}; "
            "use reduction='none'")
    # Finiteness is checked where values are concrete (training, test losses, score chunks):
    # inside vmap/grad transforms a data-dependent check is not allowed.
    return losses
