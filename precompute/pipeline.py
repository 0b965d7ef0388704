"""One precompute run: data -> training -> influence -> validation -> run directory.

``run_pipeline(config)`` is what ``python -m precompute --preset ... --out runs/NAME`` calls. All
input problems surface (as ``DataError``) before training starts; the run directory appears only
when every step has succeeded (``RunWriter`` writes a temporary sibling and renames it).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import progress as progress_report
from .agreement import solver_agreement
from .config import RunConfig
from .distributed import agreed, broadcast_object, get_rank, get_world_size, rank_zero_compute
from .errors import ConfigError
from .ekfac import with_factor_cache
from .manifest import Manifest
from .models import embedding_units
from .multistage import MultiStageInfluence
from .data import DataError
from .presets import TaskData, build_task, load_task_data
from .run_commit import commit_after_barrier, rank_zero_writer
from .run_writer import RunWriter
from .solvers import ExactSolver, InverseHVP
from .streaming import is_lazy, release_pages
from .task import TwoStageTask
from .training import TrainedStages, train_stages


@dataclass
class Timer:
    """Wall-clock seconds per named step, in order; ``report``: progress lines (precompute.progress)."""

    seconds: dict[str, float] = field(default_factory=dict)
    report: bool = False

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        with progress_report.step(name, enabled=self.report):
            yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def choose_test_points(labels: np.ndarray, correct: np.ndarray, n: int) -> list[int]:
    """Up to n finetune test ids covering every class, alternating wrong and right predictions.

    Classes are visited round-robin; within a class wrong predictions come first (they are what
    users debug), then right ones, each in id order, so the choice is deterministic.
    """
    queues = []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        wrong, right = list(ids[~correct[ids]]), list(ids[correct[ids]])
        interleaved = [x for pair in zip(wrong, right) for x in pair]
        longer = wrong if len(wrong) > len(right) else right
        queues.append(interleaved + longer[min(len(wrong), len(right)):])
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(int(q.pop(0)))
    return chosen


def predictions(task: TwoStageTask, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class [n], loss [n]) on the finetune test set."""
    with torch.no_grad():
        out = task.finetune_outputs(q, task.test_x)
        loss = task.finetune_loss(out, task.test_y)
    return out.argmax(1).cpu().numpy(), loss.cpu().numpy()


def stage_weights(task: TwoStageTask, embedding: torch.Tensor, head: torch.Tensor, head_name: str) -> dict[str, np.ndarray]:
    """Named tensors of one trained stage, {"embedding.<param>": ..., "<head_name>.<param>": ...}."""
    layout = task.w_layout if head_name == "pretrain_head" else task.u_layout
    named = {f"embedding.{k}": v for k, v in task.theta_layout.unflatten(embedding).items()}
    named |= {f"{head_name}.{k}": v for k, v in layout.unflatten(head).items()}
    return {k: v.detach().cpu().contiguous().numpy() for k, v in named.items()}


def pretrain_predictions(task: TwoStageTask, p: torch.Tensor, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(loss [m], predicted class [m]) of the pretrained model on its pretraining set, in chunks
    (the set may be streamed from disk)."""
    loss, pred = np.empty(task.m, dtype=np.float64), np.empty(task.m, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, task.m, chunk_size):
            sl = slice(start, min(start + chunk_size, task.m))
            out = task.pretrain_outputs(p, task.pretrain_x[sl])
            loss[sl] = task.pretrain_loss(out, task.pretrain_y[sl]).cpu().numpy()
            pred[sl] = out.argmax(1).cpu().numpy()
    release_pages(task.pretrain_x)
    return loss, pred


def pretrain_table(data: TaskData, task: TwoStageTask, p: torch.Tensor) -> pd.DataFrame:
    loss, pred = pretrain_predictions(task, p)
    ex = data.pretrain
    table = pd.DataFrame({"id": np.arange(len(ex)), "label": ex.labels,
                          "label_name": np.asarray(ex.class_names)[ex.labels], "source": list(ex.sources),
                          "pretrain_loss": loss, "predicted_label": pred})
    if ex.texts is not None:
        table["text"] = list(ex.texts)
    if data.flipped is not None:
        table["original_label"] = data.original_pretrain_labels
        table["flipped"] = data.flipped
    return table


def test_table(data: TaskData, preds: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    ex = data.finetune_test
    table = pd.DataFrame({"id": np.arange(len(ex)), "label": ex.labels,
                          "label_name": [ex.class_names[i] for i in ex.labels], "source": list(ex.sources)})
    if ex.texts is not None:
        table["text"] = list(ex.texts)
    for s, (pred, loss) in preds.items():
        table[f"pred_{s}"], table[f"loss_{s}"], table[f"correct_{s}"] = pred, loss, pred == ex.labels
    return table


@dataclass
class RunSummary:
    path: Path
    manifest: dict

    def lines(self) -> list[str]:
        m = self.manifest
        out = [f"run written to {self.path}",
               f"  pretraining: {m['n_pretrain']} examples, accuracy {m['pretrain_accuracy']:.3f}"]
        for s in m["scenarios"]:
            acc = m["finetune_accuracy"][s]
            v = m["validation"].get(s)
            fit = (f"; vs retraining: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}, "
                   f"slope {v['slope']:.2f} over {v['n_pairs']} removals") if v else ""
            out.append(f"  {s:8} finetune test accuracy {acc:.3f}{fit}")
            agree = (m.get("solver_agreement") or {}).get(s)
            if agree and "error" in agree:
                out.append(f"  {s:8} {agree['reference']} could not check {agree['solver']}: {agree['error']}")
            elif agree:
                out.append(f"  {s:8} {agree['solver']} vs {agree['reference']} on {agree['n_test_points']} test points: "
                           f"Pearson {agree['pearson']:.3f}, Spearman {agree['spearman']:.3f}, top-{agree['top_k']} "
                           f"overlap {agree['top_helpful_overlap']:.2f} helpful / {agree['top_harmful_overlap']:.2f} harmful "
                           f"({agree['seconds']:.0f} s)")
            check = m["diagnostics"][s].get("score_precision")
            if check:
                out.append(f"  {s:8} {m['config']['influence']['score_precision']} scores vs full precision: "
                           f"Pearson {check['pearson_vs_full']:.5f} on {check['n_sample']} examples")
        training = {s: m["diagnostics"][s]["training"] for s in m["scenarios"]}
        stages = {"pretraining": training[m["scenarios"][0]]["pretrain"],
                  **{f"finetuning ({s})": t["finetune"] for s, t in training.items()}}
        certificates = [f"{stage} ‖∇‖ {r['grad_norm']:.0e}, λ_min {r['eig_min']:.1e}"
                        for stage, r in stages.items() if r.get("eig_min") is not None]
        if certificates:
            out.append("  certified minima: " + "; ".join(certificates))
        for stage, result in stages.items():
            if result.get("method") == "minibatch":
                out.append(f"  note: {stage} ran {result['iterations']} minibatch steps to a damped stationary point "
                           f"(‖∇‖ = {result['grad_norm']:.1e}, not certified); the scores use damping "
                           f"{m['config']['influence']['pretrain_solver']['damping']:g}")
            elif not result.get("certified", result["converged"]):
                eig = result.get("eig_min")
                out.append(f"  warning: {stage} stopped before a certified minimum (‖∇‖ = {result['grad_norm']:.1e}, "
                           f"λ_min = {'n/a' if eig is None else f'{eig:.1e}'}); the damped scores answer the "
                           "proximal question, not leave-one-out: raise --train-iters")
        out += self.cleaning_lines()
        out.append("  time per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in m["timings_s"].items())
                   + (f" ({m['world_size']} ranks)" if m.get("world_size", 1) > 1 else ""))
        return out


    def cleaning_lines(self) -> list[str]:
        """The mislabel checks, when the run has them: recall of the flipped labels per signal (injected noise
        only) and, per scenario, finetune accuracy with nothing removed against the best cleaning."""
        m = self.manifest
        if not isinstance(m.get("cleaning"), dict):
            return []
        out = [f"  mislabel signals: {len(m['cleaning'].get('signals', []))} per pretraining example in "
               "cleaning/signals.parquet (Data cleaning page)"]
        detection = {k: v for k, v in (m.get("mislabel_detection") or {}).items() if "auc" in v}
        if detection:
            out.append("  flipped labels found in the top 2% / 5%: " + ", ".join(
                f"{name} {v.get('recall_top_2', float('nan')):.2f} / {v.get('recall_top_5', float('nan')):.2f}"
                for name, v in sorted(detection.items(), key=lambda kv: -kv[1].get("recall_top_5", 0))))
        for s, best in (m["cleaning"].get("best_cleaning") or {}).items():
            out.append(f"  {s:8} cleaning {best['percent']:g}%: finetune accuracy ({best['on']}) {best['none']:.3f} "
                       f"with nothing removed, {best['accuracy']:.3f} after removing the top of {best['signal']}")
        return out


def run_pipeline(config: RunConfig, progress: bool = True) -> RunSummary:
    """Runs every step and writes the run directory atomically; returns where and what.

    Under torchrun (after ``precompute.distributed.init_distributed``) every rank calls it: rank 0
    trains and broadcasts the parameters, the scoring pass is sharded over the ranks, and rank 0
    alone validates, writes and, once every rank has reported success, commits the run. A failure
    on any rank raises on every rank and leaves no run directory.
    """
    rank, world = get_rank(), get_world_size()
    main = rank == 0
    progress = progress and main
    timer = Timer(report=progress)
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())     # cuda:LOCAL_RANK
    dtype = {"float64": torch.float64, "float32": torch.float32}[config.dtype]
    with rank_zero_writer(config.out, overwrite=config.overwrite) as writer:   # fails fast if --out exists
        with timer.step("load data"), agreed("loading data"):
            data, task, config = load(config, device, dtype)
        with timer.step("train"):
            trained = rank_zero_compute(train_stages, task, config.train, config.influence.scenarios,
                                        progress=progress, device=device, what="training")
        try:
            preds = {s: predictions(task, trained.q(s)) for s in config.influence.scenarios}
            test_ids = pick_test_points(config, data, task, preds)
            with timer.step("influence"):
                # ekfac/pcg factors saved in the run (factors/*.safetensors): fitted once, reused by the agreement
                solving = with_factor_cache(config.influence, writer.path / "factors" if writer else None)
                influence = MultiStageInfluence(task, trained, solving, progress=progress).fit()
                scores = influence.scores(test_ids, out_dir=writer.path if config.scores_to_disk and main else None)
            agreement = {}
            if config.influence.agreement_solver:
                with timer.step(f"solver agreement ({config.influence.agreement_solver})"):
                    agreement = solver_agreement(task, trained, scores, test_ids, solving, progress)
            manifest = None
            with agreed("validating and writing the run"):
                if main:
                    evidence = validation_evidence(task, trained, scores, test_ids, config, timer, progress,
                                                   influence.solver)
                    evidence = cleaning_evidence(evidence, data, task, trained, config, timer, progress,
                                                 influence.solver)
                    with timer.step("write files"):
                        manifest = write_run(writer, data, task, trained, scores, influence.diagnostics, preds,
                                             test_ids, replace(evidence, agreement=agreement or None), config,
                                             timer, device, world)
        finally:
            trained.hessians.clear()         # shared by certificates, solves, retraining and baselines: done
        path = commit_after_barrier(writer, manifest)
    return RunSummary(path, manifest.as_dict() if manifest is not None else {})


def load(config: RunConfig, device: torch.device, dtype: torch.dtype) -> tuple[TaskData, TwoStageTask, RunConfig]:
    """The data, the task on ``device``/``dtype``, and ``config`` adjusted to them (a pretraining set
    streamed from disk writes its scores to disk). Every input problem surfaces here (``DataError``)."""
    data = load_task_data(config.data, config.model)
    task = build_task(data, config.model, seed=config.data.seed).to(device, dtype)
    if config.test_ids:
        task.check_test_ids(config.test_ids)
    if is_lazy(task):
        check_streamable(config, data)
        config = replace(config, scores_to_disk=True)       # [T, m] scores may not fit in memory
    return data, task, config


def pick_test_points(config: RunConfig, data: TaskData, task: TwoStageTask,
                     preds: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[int]:
    """``config.test_ids`` if given, else ``choose_test_points`` on the first scenario's predictions
    (rank 0's choice, on every rank)."""
    if config.test_ids:
        return task.check_test_ids(config.test_ids).tolist()
    first = preds[config.influence.scenarios[0]][0]
    return broadcast_object(choose_test_points(data.finetune_test.labels, first == data.finetune_test.labels,
                                               config.n_test_points))


def check_streamable(config: RunConfig, data: TaskData) -> None:
    """A pretraining set streamed from disk supports training, influence and scoring; validation by
    retraining and the mislabel checks hold many models over the whole set in memory."""
    if config.validate or config.clean or data.flipped is not None:
        raise DataError(f"{config.data.pretrain_data}: this pretraining set is read from disk in chunks "
                        "(.npy); validation by retraining and the mislabel checks need it in memory, so add "
                        "--no-validate and drop --clean/--label-noise (or validate on a subsample)")


def write_run(writer: RunWriter, data: TaskData, task: TwoStageTask, trained: TrainedStages,
              scores: dict[str, np.ndarray], diagnostics: dict, preds: dict, test_ids: list[int], evidence: "Evidence",
              config: RunConfig, timer: Timer, device: torch.device, world: int) -> Manifest:
    """Every file of the run but the manifest (rank 0); returns the manifest to commit."""
    diagnostics = {s: {**diagnostics[s], "training": {"pretrain": trained.pretrain.summary(),
                                                      "finetune": trained.finetune[s].summary()}}
                   for s in config.influence.scenarios}
    pre_table = write_files(writer, data, task, trained, scores, preds, evidence, config)
    return Manifest(
        preset=config.data.preset, modality=data.modality, n_pretrain=task.m,
        n_finetune_test=len(data.finetune_test), test_points=test_ids,
        validation_test_points=evidence.validation_test_points, scenarios=list(config.influence.scenarios),
        pretrain_class_names=list(data.pretrain.class_names),
        finetune_class_names=list(data.finetune_test.class_names),
        pretrain_accuracy=float((pre_table["predicted_label"] == pre_table["label"]).mean()),
        finetune_accuracy={s: float((preds[s][0] == data.finetune_test.labels).mean())
                           for s in config.influence.scenarios},
        validation=evidence.summary, baselines=evidence.baselines, group_removal=evidence.group_summary,
        validation_protocol=evidence.protocol, lds=evidence.lds, timings_s=timer.seconds, diagnostics=diagnostics,
        config=asdict(config), device=str(device), dtype=config.dtype, world_size=world,
        n_pretrain_params=task.n_pretrain_params, n_finetune_params=task.n_finetune_params,
        label_noise=None if data.flipped is None else {
            "rate": config.data.label_noise, "seed": config.data.seed, "n_flipped": int(data.flipped.sum())},
        mislabel_detection=evidence.mislabel_detection, cleaning=evidence.cleaning,
        image_shape=list(data.pretrain.images.shape[1:]) if data.modality == "image" else None,
        solver_agreement=evidence.agreement,
        embedding_units=embedding_units(task, trained))


def write_files(writer: RunWriter, data: TaskData, task: TwoStageTask, trained: TrainedStages,
                scores: dict[str, np.ndarray], preds: dict, evidence: "Evidence", config: RunConfig) -> pd.DataFrame:
    """Every file of the run but the manifest; returns the pretraining table."""
    if not config.scores_to_disk:        # else the scoring pass has written scores/<scenario>.npy
        for s, matrix in scores.items():
            writer.save_array(f"scores/{s}.npy", matrix.astype(np.float32))
    pre_table = pretrain_table(data, task, trained.p)
    writer.save_table("pretrain.parquet", pre_table)
    writer.save_table("finetune_test.parquet", test_table(data, preds))
    if data.modality == "image":
        writer.save_array("images/pretrain.npy", data.pretrain.images)
        writer.save_array("images/finetune_test.npy", data.finetune_test.images)
    else:
        writer.save_json("text/vectorizer.json", data.vectorizer.to_dict())
    nt = task.n_theta
    writer.save_tensors("weights/pretrain.safetensors",
                        stage_weights(task, trained.p[:nt], trained.p[nt:], "pretrain_head"))
    for s in config.influence.scenarios:
        q = trained.q(s)
        writer.save_tensors(f"weights/finetune_{s}.safetensors", stage_weights(task, q[:nt], q[nt:], "finetune_head"))
    for rel, table in evidence.tables.items():
        writer.save_table(rel, table)
    return pre_table


@dataclass
class Evidence:
    """What retraining and the baselines say about the scores (empty when validation is off)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    validation_test_points: list[int] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    group_summary: dict = field(default_factory=dict)
    protocol: str = "not run (--no-validate)"
    lds: dict | None = None
    mislabel_detection: dict | None = None
    cleaning: dict | None = None
    agreement: dict | None = None          # per scenario: the run's solver vs a reference (precompute.agreement)


def validation_evidence(task: TwoStageTask, trained: TrainedStages, scores: dict[str, np.ndarray],
                        test_ids: list[int], config: RunConfig, timer: Timer, progress: bool,
                        solver: InverseHVP | None = None) -> Evidence:
    """Retraining ground truth and baselines (docs/design.md §3), or an empty ``Evidence``. ``solver``:
    the fitted pretraining solver, which the single-stage baselines reuse when it is exact."""
    if not config.validate:
        return Evidence()
    from .baselines import evaluate_baselines
    from .validation import validate

    with timer.step("validation"):
        result = validate(task, trained, scores, test_ids, config.validation, progress=progress)
    with timer.step("baselines"):
        reuse = isinstance(solver, ExactSolver) and config.influence.pretrain_solver.curvature == "hessian"
        baselines = evaluate_baselines(task, trained, test_ids, result.pairs, config.validation,
                                       solver=solver if reuse else config.influence.pretrain_solver, progress=progress)
    n_val = min(config.validation.n_test_points, len(test_ids))
    return Evidence(tables={"validation/pairs.parquet": result.pairs, "validation/group.parquet": result.group},
                    validation_test_points=list(test_ids[:n_val]), summary=result.summary,
                    baselines=baselines, group_summary=result.group_summary, protocol=result.protocol,
                    lds=result.lds)


def cleaning_evidence(evidence: Evidence, data: TaskData, task: TwoStageTask, trained: TrainedStages,
                      config: RunConfig, timer: Timer, progress: bool, solver: InverseHVP | None = None) -> Evidence:
    """``evidence`` with the mislabel signals and clean-and-retrain added (``precompute.cleaning``), when
    ``config.clean`` is set or labels were flipped on purpose; else ``evidence`` unchanged. ``solver``: the
    influence step's pretraining solver, reused (its factorisation or factors are not fitted twice)."""
    if not (config.clean or data.flipped is not None):
        return evidence
    from .cleaning import run_cleaning

    with timer.step("cleaning"):
        cleaning = run_cleaning(task, trained, data.flipped, config.influence, config.cleaning, progress,
                                config.train, solver)
    return replace(evidence, tables={**evidence.tables, "cleaning/signals.parquet": cleaning.signals,
                                     "cleaning/retrain.parquet": cleaning.retrain},
                   mislabel_detection=cleaning.detection, cleaning=cleaning.manifest_info())
