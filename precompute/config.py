"""Every knob of the project, with its default and meaning, in one place.

The CLI (``python -m precompute``) maps its flags onto these dataclasses and reads each flag's
default and help from here (``knob``: the help is the field's metadata); library users build them
directly. All are frozen so that a config can be recorded in a run's manifest as it was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

SOLVERS = ("auto", "exact", "cg", "lissa", "arnoldi", "ekfac", "pcg", "lanczos-pcg")
KFAC_SOLVERS = ("ekfac", "pcg")     # built on the EK-FAC factors of a model's layers
CURVATURES = ("hessian", "ggn")
HESSIAN_PRODUCTS = ("double-backward", "forward-over-reverse")   # how dense Hessians are built (TrainConfig)
AUTO_EXACT_MAX_DIM = 6000   # "auto" picks exact up to this many parameters, pcg or cg above
SCENARIOS = ("fixed", "updated")
FASHION_PRESETS = ("fashion", "fashion-all")     # the presets built on Fashion-MNIST and ``models.fashion_cnn``
SCORE_PRECISIONS = ("full", "bfloat16", "float16")
DEFAULT_L2 = 1e-2
"""λ of both stages' L2 terms unless set (``TwoStageTask``, ``ModelConfig``): on the preset models
it keeps the smallest Hessian eigenvalue near 1e-4 rather than 1e-5, so solves and retraining
converge; the paper's setting is a small positive λ too (influence needs a strict minimum)."""


def knob(default, help: str):
    """A dataclass field with a command-line help text (``precompute.cli`` reads both)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SolverConfig:
    """How to apply an inverse Hessian, ``x = (H + damping·I)⁻¹ b``.

    name:     "auto" ("exact" up to AUTO_EXACT_MAX_DIM parameters; above, "pcg" when every parameter
              sits in a Linear/Conv2d layer and L2 + damping > 0, else "cg"; ``solver_registry.resolve``),
              "exact" (dense Hessian + eigendecomposition; P up to a few thousand),
              "cg" (conjugate gradient, batched over right-hand sides),
              "lissa" (Neumann series; scale from a Lanczos estimate of λ_max),
              "arnoldi" (rank-``rank`` eigendecomposition reused for every right-hand side),
              "ekfac" (EK-FAC of the Gauss-Newton matrix per Linear/Conv2d layer; approximate, fast),
              "pcg" (CG on ``curvature`` products preconditioned by the damped EK-FAC inverse; exact).
              "lanczos-pcg" (cg preconditioned by a low-rank Lanczos factorisation, precompute.lowrank).
    damping:  λ added to the Hessian's diagonal. 0 is exact influence; raise it when the solver
              reports a non-positive eigenvalue or does not converge.
    max_iter: iteration cap for cg and lissa.
    tol:      relative residual ‖(H+λI)x − b‖/‖b‖ at which cg stops; lissa stops when its update
              falls below it.
    rank:     number of eigenpairs kept by arnoldi (Krylov steps are ``rank + oversample``).
    oversample: extra Krylov steps for arnoldi, discarded after the eigendecomposition.
    max_residual: a solve whose final relative residual exceeds this raises ``SolverError``
              (arnoldi is exempt: it projects onto its subspace by design; its residual is reported).
    seed:     seed of the random start vectors of power iteration, Lanczos and Arnoldi.
    curvature: "hessian" (default: exact influence, what the finite-difference check measures) or
              "ggn" (Gauss-Newton Jᵀ H_out J + the objective's quadratic terms: positive semi-definite,
              so cg/pcg never meet negative curvature on a non-convex net; an approximation where
              the loss is not at a minimum of a convex-output model). Applies to the pretraining
              system and the updated scenario's (H_F + αD); the fixed scenario's finetune side always
              uses the Hessian (its head is small and solved exactly).
    factors_dir: ekfac/pcg: directory where EK-FAC factors are saved as safetensors and reloaded
              when they were fitted at the same parameters ("" = keep them in memory only).
    factor_chunk: examples per chunk of the two streamed EK-FAC fitting passes.
    deflation: pcg: Lanczos steps (single-column products) on the EK-FAC-whitened system whose
              extreme Ritz pairs complete the preconditioner (``precompute.ekfac.DeflatedEKFAC``);
              0 = the plain damped EK-FAC inverse. Memory: deflation × P numbers (Lanczos basis).
    """

    name: str = knob("auto", "inverse-Hessian solver: exact (dense), cg, lissa, arnoldi, ekfac (EK-FAC per "
                             "Linear/Conv2d layer, approximate), pcg (CG preconditioned by EK-FAC, exact); "
                             f"auto = exact up to {AUTO_EXACT_MAX_DIM:,} parameters, else pcg (cg when a "
                             "layer is not Linear/Conv2d)")
    damping: float = knob(0.0, "λ added to every Hessian")
    max_iter: int = knob(1000, "cg/lissa iterations at most")
    tol: float = 1e-6
    rank: int = knob(128, "arnoldi: eigenpairs kept")
    oversample: int = 16
    max_residual: float = 1e-2
    seed: int = 0
    curvature: str = knob("hessian", "hessian: exact influence; ggn: Gauss-Newton Jᵀ H_out J, positive "
                                     "semi-definite, so cg/pcg never meet negative curvature on non-convex nets "
                                     "(ekfac always models the GGN)")
    factors_dir: str = ""
    factor_chunk: int = 512
    deflation: int = 128

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ConfigError(f"unknown curvature {self.curvature!r}; choose one of {', '.join(CURVATURES)}")
        if self.name not in SOLVERS:
            raise ConfigError(f"unknown solver {self.name!r}; choose one of {', '.join(SOLVERS)}")
        if self.damping < 0:
            raise ConfigError(f"damping must be >= 0, got {self.damping}")


@dataclass(frozen=True)
class TrainConfig:
    """Deterministic full-batch training of a stage: L-BFGS, then Newton steps.

    max_iter:   L-BFGS iterations at most.
    lbfgs_tol:  L-BFGS stops when the gradient norm falls below it.
    grad_tol:   target gradient norm; a stage has converged when ‖∇‖ ≤ grad_tol.
    history_size: L-BFGS memory.
    newton_polish: Newton steps (with a step-halving safeguard) after L-BFGS: dense Hessian when the
                stage has at most ``dense_polish_max_params`` parameters, else Hessian-free Newton-CG
                (``training.newton_cg_polish``: at most 100 Hessian-vector products per step); they
                reach machine precision in a few steps near a minimum, which the retraining check
                relies on.
    newton_max_params: the certificate's Hessian is dense (``eigvalsh``) up to this many parameters,
                Lanczos above.
    dense_polish_max_params: the polish's Hessian is dense up to this many parameters (at most
                ``newton_max_params``). A dense polish costs P products per factorisation, on top of
                the certificate's one; on a CNN whose products are slow (quick fashion: ~60 s per dense
                Hessian on 2 cores) Hessian-free Newton-CG reaches the target for a fraction of that.
    hessian_products: how dense Hessians (the certificate's, a dense polish's) are built, one of
                ``HESSIAN_PRODUCTS``: "double-backward" (fastest on the MLPs) or "forward-over-reverse"
                (1.7x faster on the quick fashion CNN, which uses it). Equal up to rounding.
    rounds:     L-BFGS + Newton rounds at most, not counting rounds that end on a saddle escape.
    max_escapes: saddle escapes at most per stage (each lowers the objective, so escapes cannot cycle;
                each costs one dense Hessian or one Lanczos run, then cheap L-BFGS iterations).
    init_jitter: relative perturbation of the initial weights, x0·(1 + init_jitter·N(0, 1)): emulates
                another CPU's rounding (1e-12 moves a non-convex trajectory as far as another BLAS
                does) for seed sweeps; 0 = the modules' initial weights exactly.
    jitter_seed: seed of that perturbation.
    alpha:      proximal coefficient α of the "updated" finetune, (α/2)‖θ − θ*‖²; the trained stages
                record it (``TrainedStages.alpha``) and the influence of that scenario reads it there.
    newton_subsample: pretraining examples (a fixed random subset) whose dense Hessian preconditions the
                Newton polish of pretraining when m is larger: each Newton step is then CG on exact
                full-data Hessian products, and the full dense Hessian (P products over all m examples,
                about 14 minutes for the 1,989-parameter CNN at m = 5,000 on 2 idle cores: 109 s per 256 products) is built once, by the
                certificate at the minimum, instead of once per polish. 0: the full data (exact polish).
    minibatch_epochs: pretraining by this many epochs of minibatch Adam instead of full-batch L-BFGS and
                Newton (``training.minibatch_pretrain``): for pretraining sets too large for a certified
                minimum on a CPU. The stage ends at a damped stationary point (its full-batch ‖∇‖ is
                reported, no certificate), which only damped solves (--damping > 0) may score. 0 = off.
    minibatch_size: examples per Adam step.   minibatch_lr: Adam's initial learning rate (cosine-decayed to 0).
    stream_chunk: pretraining examples per chunk when pretraining evaluates its objective chunk by
                chunk (``precompute.streaming``: memory O(chunk), not O(m)). 0: stream only when the
                task's pretraining inputs are ``LazyRows`` (memory-mapped), in chunks of 4,096;
                otherwise one autograd graph over the whole set. Newton polish, when it applies,
                then costs ⌈P/256⌉ passes over the data per step.
    """

    max_iter: int = knob(3000, "L-BFGS iterations at most per stage; lower it for very large pretraining sets, "
                               "where each iteration is a pass over the data")
    lbfgs_tol: float = 1e-5
    grad_tol: float = 1e-9
    history_size: int = 20
    newton_polish: int = knob(10, "Newton polish steps after L-BFGS (each costs about P/256 passes over the "
                                  "pretraining set; 0 turns it off)")
    newton_max_params: int = 6000
    dense_polish_max_params: int = 6000
    hessian_products: str = "double-backward"
    rounds: int = 6
    max_escapes: int = 30
    newton_subsample: int = 0
    minibatch_epochs: int = knob(0, "pretrain by this many epochs of minibatch Adam (a damped stationary point, "
                                    "not a certified minimum; needs --damping > 0); 0 = full-batch L-BFGS + Newton")
    minibatch_size: int = 128
    minibatch_lr: float = knob(3e-3, "Adam's initial learning rate for --minibatch-epochs (cosine-decayed to 0)")
    stream_chunk: int = 0
    init_jitter: float = knob(0.0, "relative perturbation of the initial weights (e.g. 1e-12) to emulate another "
                                   "CPU's rounding in seed sweeps; 0 = none")
    jitter_seed: int = 0
    alpha: float = knob(0.1, "proximal coefficient α of the 'updated' scenario (larger keeps the finetuned "
                             "embedding closer to the pretrained one)")

    def __post_init__(self) -> None:
        if self.newton_subsample < 0:
            raise ConfigError(f"newton_subsample must be >= 0, got {self.newton_subsample}")
        if self.minibatch_epochs < 0 or self.minibatch_size < 1 or not self.minibatch_lr > 0:
            raise ConfigError(f"minibatch training needs epochs >= 0, size >= 1 and lr > 0, got "
                              f"{self.minibatch_epochs}, {self.minibatch_size}, {self.minibatch_lr}")
        if self.hessian_products not in HESSIAN_PRODUCTS:
            raise ConfigError(f"hessian_products must be one of {', '.join(HESSIAN_PRODUCTS)}, got "
                              f"{self.hessian_products!r}")
        if self.stream_chunk < 0:
            raise ConfigError(f"stream_chunk must be >= 0, got {self.stream_chunk}")
        if self.max_iter < 0:
            raise ConfigError(f"training iterations (--train-iters) must be >= 0, got {self.max_iter}")
        if not 0 <= self.init_jitter < 1:
            raise ConfigError(f"init_jitter must be in [0, 1), got {self.init_jitter}")
        if self.newton_polish < 0:
            raise ConfigError(f"Newton steps (--newton-steps) must be >= 0, got {self.newton_polish}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0 (without the proximal term the influence is 0), got {self.alpha}")


@dataclass(frozen=True)
class InfluenceConfig:
    """Multi-stage influence scoring.

    scenarios:  which finetuning scenarios to score: "fixed" (embedding frozen during finetuning)
                and/or "updated" (embedding finetuned with the proximal term (α/2)‖θ − θ*‖²).
                (α comes from the trained stages: ``TrainConfig.alpha``, recorded in ``TrainedStages.alpha``.)
    pretrain_solver: solver for H_P⁻¹ over (θ, W).
    finetune_solver: solver for H_UU⁻¹ ("fixed") or (H_F + αD)⁻¹ ("updated").
    chunk_size: pretraining examples per chunk of the streamed scoring pass; peak memory is
                about chunk_size × P floats.
    distributed_solve: under torchrun, solve H_P⁻¹ on every rank in lockstep with a data-parallel
                Hessian-vector product (each rank's shard, all-reduced; the default). False: rank 0
                solves alone over the whole set and broadcasts (no all-reduce per product; faster
                for small sets). Single process: no effect.
    score_precision: "full" (the model's dtype), "bfloat16" or "float16": the per-example gradients
                of the scoring pass run under torch.autocast (float32 models; mostly a GPU speed-up).
                The run then re-scores a sample at full precision and reports the Pearson
                correlation in its diagnostics.
    agreement_solver: a reference pretraining solver ("pcg", or any other) that re-scores the first
                ``agreement_points`` test points; the run records per scenario how well the two agree
                (``precompute.agreement``: Pearson, Spearman, top-100 overlap). The evidence of runs too
                large for retraining. "" = none.
    agreement_points: test points re-scored by ``agreement_solver``.
    """

    scenarios: tuple[str, ...] = knob(SCENARIOS, "finetuning scenarios to score, comma-separated")
    pretrain_solver: SolverConfig = field(default_factory=SolverConfig)
    finetune_solver: SolverConfig = field(default_factory=SolverConfig)
    chunk_size: int = knob(256, "pretraining examples per scoring chunk")
    distributed_solve: bool = True
    score_precision: str = knob("full", "full (the model's dtype), or bfloat16/float16 autocast for the "
                                        "per-example gradients of the scoring pass (needs --dtype float32; a GPU "
                                        "speed-up); the run reports the Pearson correlation with full precision "
                                        "on a sample")
    agreement_solver: str = knob("", "re-score the first --agreement-points test points with this pretraining "
                                     "solver (e.g. pcg) and record how well it agrees with --solver; '' = none")
    agreement_points: int = knob(4, "test points re-scored by --agreement-solver")

    def __post_init__(self) -> None:
        if self.agreement_solver and self.agreement_solver not in SOLVERS[1:]:
            raise ConfigError(f"unknown agreement solver {self.agreement_solver!r}; choose one of "
                              f"{', '.join(SOLVERS[1:])}, or '' for none")
        if self.agreement_points < 1:
            raise ConfigError(f"agreement_points must be >= 1, got {self.agreement_points}")
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise ConfigError(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.score_precision not in SCORE_PRECISIONS:
            raise ConfigError(f"unknown score precision {self.score_precision!r}; choose from "
                             f"{', '.join(SCORE_PRECISIONS)}")


@dataclass(frozen=True)
class ValidationConfig:
    """Ground truth by actual retraining (docs/design.md §3) and baselines.

    n_test_points:   validation test points per scenario (the first K scored test points).
    k:               leave-one-out removals per kind (top-k helpful, top-k harmful, k random).
    group_percents:  group removal sizes, in percent of the pretraining set.
    lds:             also compute the linear datamodeling score (random subsets).
    lds_subsets:     number of random subsets for LDS (at least 32).
    lds_fraction:    fraction of the pretraining set each LDS subset keeps.
    retrain_tol:     a retraining has converged when ‖∇objective‖ ≤ retrain_tol.
    retrain_max_iter: iteration cap per retraining.
    per_model_hessians: stragglers (still above tol after ``retraining.SHARED_ITERS`` steps) get a dense
                     Hessian of their own every ``REFRESH_ITERS`` steps (P products each); False keeps
                     the shared preconditioner (models whose Hessian costs minutes).
    retrain_newton_steps: without per-model Hessians, stragglers after ``retraining.NEWTON_AFTER`` L-BFGS
                     steps take up to this many truncated Newton steps (CG on Hessian-vector products,
                     preconditioned by the shared Hessian; up to ``retraining.NEWTON_CG_ITERS`` products
                     per step per model); 0 = L-BFGS to the cap.
    batch_size:      retrainings run together in one batched (vmapped) optimisation.
    seed:            seed of the random removals and subsets.
    """

    n_test_points: int = knob(8, "validation test points")
    k: int = knob(8, "leave-one-out removals per kind")
    group_percents: tuple[float, ...] = knob((1.0, 2.0, 5.0, 10.0), "group removal sizes, % of the pretraining set")
    lds: bool = knob(False, "also compute the linear datamodeling score")
    lds_subsets: int = 32
    lds_fraction: float = 0.5
    retrain_tol: float = 1e-8
    retrain_max_iter: int = knob(200, "iterations at most per retrained stage (a model still above the tolerance "
                                      "is flagged as not converged and left out of the fit figures)")
    batch_size: int = 64
    seed: int = 0
    per_model_hessians: bool = True
    retrain_newton_steps: int = knob(0, "without per-model Hessians (the CNN presets), truncated Newton steps at most "
                                        "for retrainings still above the tolerance after 30 L-BFGS steps (0 = off)")


@dataclass(frozen=True)
class CleaningConfig:
    """Knobs of ``run_cleaning``.

    scenario:  scenario whose scores define the multi-stage signals (None: the first scored one).
    audit_fraction: share of the finetune test set whose misclassified points are the suspects; the
               rest is held out for an unbiased clean-and-retrain evaluation (1.0: use all).
    folds:     K of the K-fold out-of-sample probabilities behind the cleanlab signal.
    percents:  removal sizes of clean-and-retrain, in percent of the pretraining set.
    retrain_tol / retrain_max_iter / batch_size: batched retraining (see precompute.retraining).
    seed:      seed of the folds and of the random removals.
    """

    scenario: str | None = None
    audit_fraction: float = 0.5
    folds: int = 5
    percents: tuple[float, ...] = (2.0, 5.0, 10.0)
    retrain_tol: float = 1e-6
    retrain_max_iter: int = 300
    batch_size: int = 32
    seed: int = 0

    def validation(self) -> ValidationConfig:
        return ValidationConfig(retrain_tol=self.retrain_tol, retrain_max_iter=self.retrain_max_iter,
                                batch_size=self.batch_size, seed=self.seed)


@dataclass(frozen=True)
class ModelConfig:
    """The preset models: embedding = Linear(d_in, hidden) + tanh, heads = Linear(hidden, classes).

    hidden:       embedding width.
    channels:     the fashion CNN's two convolutions' output channels (``models.fashion_cnn``).
    pretrain_l2:  λ_P on (θ, W).   finetune_l2: λ_F on U.   Both ``DEFAULT_L2`` unless set (or a preset
                  sets λ_P: ``presets.QUICK_MODELS``, ``presets.NOISY_PRETRAIN_L2``).
    vocabulary:   text presets: tf-idf vocabulary size (features of the embedding's input).
    max_params:   the CLI refuses, before loading any data, inputs that would give a model of more
                  parameters (``precompute.guards``; --max-params lifts it).
    """

    hidden: int = knob(16, "embedding width")
    channels: tuple[int, ...] = knob((8, 16), "fashion CNN: output channels of its two convolutions, comma-separated")
    pretrain_l2: float = knob(DEFAULT_L2, "λ_P on the pretraining parameters")
    finetune_l2: float = knob(DEFAULT_L2, "λ_F on the finetuning head")
    vocabulary: int = knob(400, "text: tf-idf vocabulary size")
    max_params: int = knob(1_000_000, "refuse, before loading any data, inputs that would give a model of more "
                                      "parameters (for example very large images)")


@dataclass(frozen=True)
class DataConfig:
    """Where the two tasks' examples come from.

    preset:            "digits", "news", "fashion", "fashion-all" or "custom" (users' files below).
    pretrain_data / finetune_data: custom sources: an image folder (root/<class>/*.png), a CSV/JSONL
                       text file, or MNIST IDX as "IMAGES.idx,LABELS.idx". finetune_data may be
                       omitted to split one source by classes.
    pretrain_classes / finetune_classes: class names (or ids) of each task; empty = all classes of
                       that source.
    text_column / label_column: columns of CSV/JSONL sources.
    finetune_test_fraction: share of the finetune examples held out as finetune test points.
    max_pretrain / max_finetune: per-class caps (0 = no cap); quick mode sets small caps.
    label_noise:       fraction of pretraining labels flipped to another class (0 = none).
    seed:              seed of splits, subsampling and label noise.
    data_dir:          fashion: folder of the Fashion-MNIST IDX files ("" = Debian's
                       /usr/share/datasets/fashion-mnist).
    """

    preset: str = "digits"
    pretrain_data: str = knob("", "image folder root/<class>/*.png, a .csv/.jsonl text file, or MNIST IDX files "
                                  "as IMAGES,LABELS")
    finetune_data: str = knob("", "same formats; omit to split --pretrain-data by classes")
    pretrain_classes: tuple[str, ...] = knob((), "class names of the pretraining task")
    finetune_classes: tuple[str, ...] = knob((), "class names of the finetuning task")
    text_column: str = knob("text", "text column of CSV/JSONL files")
    label_column: str = knob("label", "label column of CSV/JSONL files")
    finetune_test_fraction: float = knob(0.5, "finetune examples held out as test points")
    max_pretrain: int = 0
    max_finetune: int = 0
    label_noise: float = knob(0.0, "flip this fraction of pretraining labels (recorded, to score mislabel "
                                   "detection; turns on --clean)")
    seed: int = knob(0, "seed of splits, initialisation and random removals")
    data_dir: str = knob("", "fashion: folder holding the Fashion-MNIST IDX files (default: Debian's "
                             "/usr/share/datasets/fashion-mnist, from apt-get install dataset-fashion-mnist)")


@dataclass(frozen=True)
class RunConfig:
    """One precompute run: data -> training -> influence -> validation -> run directory.

    out:          the run directory to write (atomically).
    device:       "cpu", "cuda" or "auto" (cuda when available).
    dtype:        "float64" (default: leave-one-out loss changes are ~1e-4 to 1e-3 and need it to be
                  resolved by retraining) or "float32".
    n_test_points: test points scored when test_ids is empty (chosen to cover every class with
                  right and wrong predictions).
    test_ids:     explicit finetune test ids to score.
    validate:     run the retraining validation and baselines.
    clean:        run mislabel detection and clean-and-retrain (always on when label_noise > 0).
    quick:        small sizes for tests and smoke runs (digits and news well under a minute; fashion 2-6 minutes on 2 CPU cores, by seed and CPU).
    overwrite:    replace an existing run directory (only after the new one is complete).
    scores_to_disk: stream scores into the run directory's .npy files (memory maps, written block
                  by block by every rank) instead of holding the [T, m] matrices in memory; for
                  very large pretraining sets.
    """

    out: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    clean: bool = knob(False, "rank pretraining examples by mislabel signals (multi-stage harm, "
                              "self-influence, loss, margin, cleanlab) and clean-and-retrain")
    device: str = knob("auto", "auto (cuda if available), cpu or cuda")
    dtype: str = knob("float64", "float64 resolves leave-one-out loss changes in the retraining check")
    n_test_points: int = knob(32, "number of finetune test points to score, covering every class with right "
                                  "and wrong predictions")
    test_ids: tuple[int, ...] = knob((), "explicit finetune test ids, e.g. 0,5,9")
    validate: bool = True
    quick: bool = knob(False, "small sizes for smoke tests (digits, news < 1 min; fashion 2-6 min on a 2-core CPU)")
    overwrite: bool = knob(False, "replace an existing run (the old one is kept until the new one is complete)")
    scores_to_disk: bool = knob(False, "stream scores into the run directory chunk by chunk (memory maps) "
                                       "instead of holding them in memory; for very large pretraining sets")

    def __post_init__(self) -> None:
        if self.influence.score_precision != "full" and self.dtype != "float32":
            raise ConfigError(f"score precision {self.influence.score_precision} needs a float32 model "
                             f"(autocast leaves {self.dtype} untouched); add --dtype float32")
