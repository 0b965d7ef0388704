"""Curvature benchmark: exact, cg, arnoldi, ekfac, pcg and kronfluence EK-FAC on the same models.

Models (float64, CPU, T test points, both scenarios):
  digits    the digits preset MLP (64 -> 16 tanh, P = 1,125; m = 901)
  wide      the same with 128 hidden units (P = 8,965)
  cnn       a small CNN of this benchmark's own on Fashion-MNIST (classes 0-4 pretrain, 5-9 finetune):
            Conv2d(1, 8, 5, stride 2, pad 2) -> tanh -> Conv2d(8, 16, 5, stride 2, pad 2) -> tanh ->
            Linear(784, 10) -> tanh, heads Linear(10, classes): P = 11,329 (predates the preset's CNN).
            Data: /usr/share/datasets/fashion-mnist.
  fashion-quick  the `--preset fashion --quick` task itself: its mixed split, m = 300, and quick mode's
            CNN (channels 4, 8; 8 units; P = 1,989), so the dense exact reference fits.

Per model and solver: seconds of the whole multi-stage influence step (finetune-side solves, EK-FAC
fits, the pretraining solve, the streamed scoring) and, PER SCENARIO (never pooled: the fixed
scenario's scores are several times larger and would hide a weak updated scenario), Pearson and
Spearman of the [T, m] scores with an exact reference: `exact` (dense) where P ≤ 6,000, else CG to a
relative residual of 1e-10. CG iterations of the pretraining solve (and of the updated finetune
solve) with and without the EK-FAC preconditioner.

Single-stage common ground (what kronfluence computes): ordinary influence of every pretraining
example on the pretraining loss of T query examples (the first T of the pretraining set),
∇ℓ_P(x_t)ᵀ (H_P + λI)⁻¹ ∇ℓ_P(z) / m, by our ekfac and by kronfluence 1.0.1's EK-FAC (its own
factors, float32, labels sampled from the model as its docs prescribe for the true Fisher; damping
λ_P + λ stands for the L2 term it does not model). kronfluence tracks gradients through module hooks,
so a measurement written directly in the parameters (m(p) = g · p, the multi-stage route) does not
reach it; the single-stage quantity is the comparison both can make.

Usage: python benchmarks/bench_curvature.py [--models digits,wide,cnn] [--tests 32] [--cache DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.config import DataConfig, InfluenceConfig, SolverConfig, TrainConfig  # noqa: E402
from precompute.influence import multi_stage_scores, pretrain_solver  # noqa: E402
from precompute.scoring import score_pretraining  # noqa: E402
from precompute.presets import PRESET_MODELS, QUICK_CAPS, QUICK_MODELS, build_task, load_task_data  # noqa: E402
from precompute.task import TwoStageTask  # noqa: E402
from precompute.training import train_stages  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
ALPHA = 0.1


def digits_task(hidden: int) -> TwoStageTask:
    model = replace(PRESET_MODELS["digits"], hidden=hidden)
    return build_task(load_task_data(DataConfig(preset="digits"), model), model).to("cpu", torch.float64)


def fashion_quick_task() -> TwoStageTask:
    model = QUICK_MODELS["fashion"]
    pre, fine = QUICK_CAPS["fashion"]
    data = load_task_data(DataConfig(preset="fashion", max_pretrain=pre, max_finetune=fine), model)
    return build_task(data, model).to("cpu", torch.float64)


def read_idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress((FASHION / name).read_bytes()), dtype=np.uint8, offset=offset)


def cnn_task(m: int, n_finetune: int, n_test: int, seed: int = 0) -> TwoStageTask:
    images = read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = read_idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64)
    rng = np.random.default_rng(seed)

    def pick(classes, count, skip=0):
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[skip: skip + count // len(classes)]
                              for c in classes])
        idx = rng.permutation(idx)
        return torch.tensor(images[idx] / 255.0), torch.tensor(labels[idx] - classes[0])

    px, py = pick([0, 1, 2, 3, 4], m)
    fx, fy = pick([5, 6, 7, 8, 9], n_finetune + n_test)
    torch.manual_seed(seed)
    embedding = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.Tanh(),
                              nn.Conv2d(8, 16, 5, stride=2, padding=2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(784, 10), nn.Tanh())
    task = TwoStageTask(embedding, nn.Linear(10, 5), nn.Linear(10, 5), px, py, fx[:n_finetune], fy[:n_finetune],
                        fx[n_finetune:], fy[n_finetune:], pretrain_l2=1e-2, finetune_l2=1e-2)
    return task.to("cpu", torch.float64)


def trained_stages(task, name: str, cache: Path | None, train_iters: int):
    path = cache / f"bench_curvature_{name}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    start = time.perf_counter()
    trained = train_stages(task, TrainConfig(max_iter=train_iters, alpha=ALPHA), progress=False)
    print(f"{name}: trained in {time.perf_counter() - start:.0f} s: {trained.pretrain.summary()}", file=sys.stderr)
    if path is not None:
        torch.save(trained, path)
    return trained


def agreement(scores: dict, reference: dict) -> dict:
    out = {}
    for s in ("fixed", "updated"):
        a, b = np.asarray(scores[s], np.float64).ravel(), np.asarray(reference[s], np.float64).ravel()
        out[s] = {"pearson": round(float(np.corrcoef(a, b)[0, 1]), 4), "spearman": round(float(spearmanr(a, b)[0]), 4)}
    return out


def influence_step(task, trained, ids, solver: SolverConfig):
    config = InfluenceConfig(pretrain_solver=solver, finetune_solver=solver, chunk_size=1024)
    start = time.perf_counter()
    scores, diag = multi_stage_scores(task, trained, ids, config, progress=False)
    return scores, diag, time.perf_counter() - start


def query_gradients(task, trained, t: int) -> torch.Tensor:
    """∇_p ℓ_P(x_t) for the first t pretraining examples, [P, T]."""
    from precompute.scoring import per_example_gradients
    return per_example_gradients(task, trained.p, task.pretrain_x[:t], task.pretrain_y[:t]).T


def single_stage_ours(task, trained, t: int, solver: SolverConfig):
    """∇ℓ_P(x_t)ᵀ (H_P + λI)⁻¹ ∇ℓ_P(z) / m for every z: [T, m] and seconds."""
    start = time.perf_counter()
    rhs = query_gradients(task, trained, t)
    sol = pretrain_solver(task, trained.p, solver)
    s, _ = sol.solve(rhs)
    scores = score_pretraining(task, trained.p, s, 1024, progress=False)
    return scores, time.perf_counter() - start


def single_stage_kronfluence(task, trained, t: int, damping: float):
    """kronfluence 1.0.1 EK-FAC pairwise scores for the same queries, [T, m] (divided by m)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    model = _copy_with_params(nn.Sequential(task.embedding, task.pretrain_head), trained.p).float().eval()

    class Single(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1)[:, 0]
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    class Rows(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    train = Rows(task.pretrain_x.float(), task.pretrain_y)
    queries = Rows(task.pretrain_x[:t].float(), task.pretrain_y[:t])
    ktask = Single()
    model = prepare_model(model, ktask)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        analyzer = Analyzer("bench", model=model, task=ktask, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=1024,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("scores", factors_name="ekfac", query_dataset=queries, train_dataset=train,
                                         per_device_query_batch_size=t, per_device_train_batch_size=1024,
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
        seconds = time.perf_counter() - start
    return scores / task.m, seconds


def _copy_with_params(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    import copy
    model = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(flat.detach().clone(), model.parameters())
    return model


def bench_model(name: str, task, trained, args) -> dict:
    ids = list(range(args.tests))
    p = task.n_pretrain_params
    damping = args.damping
    c = args.curvature
    ref_cfg = (SolverConfig("exact", damping=damping, curvature=c) if p <= 6000
               else SolverConfig("cg", damping=damping, tol=1e-10, max_iter=5000, curvature=c))
    reference, ref_diag, ref_seconds = influence_step(task, trained, ids, ref_cfg)
    rows = {}
    if ref_cfg.name == "cg":      # the reference is plain CG: report it as the cg row (tol 1e-10)
        rows["cg (tol 1e-10)"] = {"seconds": round(ref_seconds, 2), **agreement(reference, reference),
                                  "pretrain_iterations": ref_diag["fixed"]["pretrain_solve"]["iterations"],
                                  "updated_finetune_iterations": ref_diag["updated"]["finetune_solve"]["iterations"],
                                  "pretrain_residual": float(f'{ref_diag["fixed"]["pretrain_solve"]["relative_residual"]:.2e}')}
    solvers = {"exact": SolverConfig("exact", damping=damping, curvature=c),
               "cg": SolverConfig("cg", damping=damping, tol=1e-8, max_iter=5000, curvature=c),
               "arnoldi": SolverConfig("arnoldi", damping=damping, rank=256, oversample=32, curvature=c),
               "ekfac": SolverConfig("ekfac", damping=damping),
               "pcg": SolverConfig("pcg", damping=damping, tol=1e-8, max_iter=5000, curvature=c)}
    for solver, cfg in solvers.items():
        if (solver == "exact" and p > 6000) or (solver in args.skip.split(",")):
            continue
        try:
            scores, diag, seconds = influence_step(task, trained, ids, cfg)
        except Exception as err:    # noqa: BLE001  (a failure is a result too)
            rows[solver] = {"error": str(err)[:200]}
            continue
        rows[solver] = {"seconds": round(seconds, 2), **agreement(scores, reference),
                        "pretrain_iterations": diag["fixed"]["pretrain_solve"]["iterations"],
                        "updated_finetune_iterations": diag["updated"]["finetune_solve"]["iterations"],
                        "pretrain_residual": float(f'{diag["fixed"]["pretrain_solve"]["relative_residual"]:.2e}')}
        print(name, solver, rows[solver], file=sys.stderr, flush=True)
    # single stage: common ground with kronfluence
    t = args.tests
    ref_single, _ = single_stage_ours(task, trained, t, ref_cfg)
    single = {}
    for who, cfg in (("ekfac", SolverConfig("ekfac", damping=damping)),
                     ("pcg", SolverConfig("pcg", damping=damping, tol=1e-8, max_iter=5000, curvature=c))):
        ours, seconds = single_stage_ours(task, trained, t, cfg)
        single[who] = {"seconds": round(seconds, 2), **_pair(ours, ref_single)}
    if not args.no_kronfluence:
        try:
            theirs, seconds = single_stage_kronfluence(task, trained, t, task.pretrain_l2 + damping)
            single["kronfluence_ekfac"] = {"seconds": round(seconds, 2), **_pair(theirs, ref_single)}
        except Exception as err:    # noqa: BLE001
            single["kronfluence_ekfac"] = {"error": str(err)[:200]}
    print(name, "single stage", single, file=sys.stderr, flush=True)
    scoring = scoring_pass(task, trained, 2 * args.tests)
    print(name, "scoring pass", scoring, file=sys.stderr, flush=True)
    return {"n_params": p, "m": task.m, "reference": ref_cfg.name, "reference_seconds": round(ref_seconds, 2),
            "solvers": rows, "single_stage": single, "scoring_pass": scoring}


def scoring_pass(task, trained, t: int) -> dict:
    """Seconds of one epoch (forward + backward of the summed loss, same chunks) and of scoring every
    pretraining example for t test-side vectors by the outer-product path (Linear/Conv2d) and by
    per-example gradients (vmap(grad)); both give the same numbers."""
    p = trained.p
    vectors = torch.randn(task.n_pretrain_params, t, dtype=p.dtype, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for s in range(0, task.m, 1024):
        leaf = p.detach().requires_grad_(True)
        torch.autograd.grad(task.pretrain_losses(leaf, task.pretrain_x[s: s + 1024], task.pretrain_y[s: s + 1024]).sum(), leaf)
    epoch = time.perf_counter() - start
    out = {"epoch_s": round(epoch, 3)}
    for method in ("linear", "grad"):
        start = time.perf_counter()
        score_pretraining(task, p, vectors, 1024, progress=False, method=method)
        seconds = time.perf_counter() - start
        out[method] = {"seconds": round(seconds, 3), "epochs": round(seconds / epoch, 1)}
    return out


def bench_model_light(name: str, task, trained, args) -> dict:
    """For models whose Hessian products are too slow here for a CG-to-1e-10 reference of the whole
    multi-stage step (float64 Conv2d on a shared CPU: ~10 s per 32-column product): single stage
    only. Plain CG and pcg solve the same T query systems to ``--light-tol`` (GGN), the CG answer is
    the reference for ekfac and kronfluence; plus the multi-stage ekfac step's seconds."""
    t, damping = args.tests, args.damping
    rhs = query_gradients(task, trained, t)
    out = {"n_params": task.n_pretrain_params, "m": task.m, "tol": args.light_tol}
    solved = {}
    for who in ("cg", "pcg"):
        cfg = SolverConfig(who, damping=damping, tol=args.light_tol, max_iter=5000, curvature="ggn")
        start = time.perf_counter()
        solver = pretrain_solver(task, trained.p, cfg)
        x, diag = solver.solve(rhs)
        solved[who] = x
        out[who] = {"seconds": round(time.perf_counter() - start, 1), "iterations": diag.iterations,
                    "residual": float(f"{diag.relative_residual:.1e}")}
        print(name, who, out[who], file=sys.stderr, flush=True)
    reference = score_pretraining(task, trained.p, solved["cg"], 1024, progress=False)
    out["pcg"] |= _pair(score_pretraining(task, trained.p, solved["pcg"], 1024, progress=False), reference)
    ours, seconds = single_stage_ours(task, trained, t, SolverConfig("ekfac", damping=damping))
    out["ekfac"] = {"seconds": round(seconds, 2), **_pair(ours, reference)}
    if not args.no_kronfluence:
        theirs, seconds = single_stage_kronfluence(task, trained, t, task.pretrain_l2 + damping)
        out["kronfluence_ekfac"] = {"seconds": round(seconds, 2), **_pair(theirs, reference)}
    print(name, "single stage", out, file=sys.stderr, flush=True)
    _, diag, seconds = influence_step(task, trained, list(range(t)), SolverConfig("ekfac", damping=damping))
    out["multi_stage_ekfac_seconds"] = round(seconds, 2)
    out["curvature_model"] = diag["fixed"]["pretrain_solve"]["curvature_model"]
    return out


def _pair(a, b) -> dict:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return {"pearson": round(float(np.corrcoef(a, b)[0, 1]), 4), "spearman": round(float(spearmanr(a, b)[0]), 4)}


def markdown(results: dict) -> str:
    lines = ["| model (P) | solver | seconds | fixed Pearson / Spearman | updated Pearson / Spearman | "
             "pretrain CG iterations | updated finetune iterations |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for solver, row in r["solvers"].items():
            if "error" in row:
                lines.append(f"| {name} ({r['n_params']:,}) | {solver} | failed: {row['error'][:60]} | | | | |")
                continue
            lines.append(f"| {name} ({r['n_params']:,}) | {solver} | {row['seconds']} | "
                         f"{row['fixed']['pearson']} / {row['fixed']['spearman']} | "
                         f"{row['updated']['pearson']} / {row['updated']['spearman']} | "
                         f"{row['pretrain_iterations']} | {row['updated_finetune_iterations']} |")
    lines += ["", "| model (P) | single stage | seconds | Pearson / Spearman vs exact |", "|---|---|---|---|"]
    for name, r in results.items():
        for who, row in r["single_stage"].items():
            text = f"failed: {row['error'][:60]}" if "error" in row else \
                f"{row['seconds']} | {row['pearson']} / {row['spearman']}"
            lines.append(f"| {name} ({r['n_params']:,}) | {who} | {text} |")
    lines += ["", "| model (P) | one epoch | scoring, outer products (Linear/Conv2d) | scoring, vmap(grad) |",
              "|---|---|---|---|"]
    for name, r in results.items():
        sc = r.get("scoring_pass")
        if sc:
            lines.append(f"| {name} ({r['n_params']:,}) | {sc['epoch_s']} s | {sc['linear']['seconds']} s "
                         f"({sc['linear']['epochs']} epochs) | {sc['grad']['seconds']} s ({sc['grad']['epochs']} epochs) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,wide,cnn")
    parser.add_argument("--tests", type=int, default=32)
    parser.add_argument("--damping", type=float, default=1e-3, help="the same λ for every solver")
    parser.add_argument("--cnn-m", type=int, default=1000, help="CNN pretraining examples (finetune: half)")
    parser.add_argument("--train-iters", type=int, default=3000)
    parser.add_argument("--cache", default="", help="directory to keep trained stages between runs")
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian",
                        help="curvature of every solver and the reference (ggn where a model is not at a minimum)")
    parser.add_argument("--light", default="", help="models to measure single stage only (bench_model_light)")
    parser.add_argument("--light-tol", type=float, default=1e-6)
    parser.add_argument("--skip", default="", help="solvers to leave out, e.g. cg (a CG reference is reported anyway)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    builders = {"digits": lambda: digits_task(16), "wide": lambda: digits_task(128),
                "cnn": lambda: cnn_task(args.cnn_m, max(100, args.cnn_m // 2), 200), "fashion-quick": fashion_quick_task}
    results, light = {}, {}
    for name in args.models.split(","):
        task = builders[name]()
        trained = trained_stages(task, name, cache, args.train_iters)
        if name in args.light.split(","):
            light[name] = bench_model_light(name, task, trained, args)
            continue
        results[name] = bench_model(name, task, trained, args)
    print(json.dumps({"tests": args.tests, "damping": args.damping, "alpha": ALPHA, "curvature": args.curvature,
                      "results": results, "single_stage_only": light}, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
