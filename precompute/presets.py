"""From a data configuration to a ``TwoStageTask``: the digits and news presets and users' files.

    digits  pretrain on sklearn's real 8x8 digits 0-4, finetune on 5-9 (the paper's MNIST setting
            with one class more); inputs are the 64 pixel intensities in [0, 1].
    news    BBC News articles: pretrain a topic classifier on business / politics / tech, finetune
            on entertainment vs sports; inputs are tf-idf vectors over a vocabulary fitted on the
            training texts (never on finetune test texts).
    fashion Fashion-MNIST (Debian's dataset-fashion-mnist, or IDX files in --data-dir): pretrain a
            small CNN (``models.fashion_cnn``, P = 1,989: the dense Hessian fits) on T-shirt, coat,
            shirt, sandal, ankle boot (m = 5,000; quick 300), finetune on trouser, pullover, dress,
            sneaker, bag; inputs are 28x28 grey in [0, 1]. Each task mixes tops and footwear, so
            pretrained features transfer (at quick size, fixed-embedding accuracy 0.69 pretraining on
            tops alone with an 11,813-parameter CNN; mixed: 0.76 with a 4,489-parameter CNN, 0.74 with
            the 1,989-parameter one; with 20 finetune examples per class, 0.76 with the 40 used now).
    fashion-all  every training garment of the same five classes (m = 30,000; quick 2,000), a CNN of
            54,693 parameters in float32, pretrained by minibatch Adam to a damped stationary point,
            scored by ekfac and checked against pcg on its first test points (``fashion_all_config``).
    custom  an image folder, MNIST IDX files or a CSV/JSONL text table per task, or one source
            split by classes.
All problems with the inputs raise ``DataError`` before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import FASHION_PRESETS, DataConfig, ModelConfig, RunConfig, SolverConfig
from .data import (DataError, LabelledExamples, TextVectorizer, flip_labels, image_features,
                   load_bbc_news, load_digits_examples, load_image_folder, load_mnist_idx, load_npy_images,
                   load_text_table, select_classes, split_train_test, subsample_per_class)
from .data.fashion import load_fashion_mnist
from .models import fashion_cnn
from .streaming import LazyRows
from .task import TwoStageTask

PRESETS = ("digits", "news", "fashion", "fashion-all", "custom")
FASHION_PRETRAIN = ("T-shirt/top", "Coat", "Shirt", "Sandal", "Ankle boot")
FASHION_FINETUNE = ("Trouser", "Pullover", "Dress", "Sneaker", "Bag")
NEWS_PRETRAIN_TOPICS = ("business", "politics", "tech")
NEWS_FINETUNE_TOPICS = ("entertainment", "sports")
# Sizes chosen so that P stays within the exact solver and Newton polish (<= 6,000 parameters),
# and L2 so that both stages are well conditioned (smallest Hessian eigenvalue ~1e-4, not ~1e-5).
PRESET_MODELS = {"digits": ModelConfig(hidden=16),
                 "news": ModelConfig(hidden=6, vocabulary=250),
                 "fashion": ModelConfig(hidden=8, channels=(4, 8)),      # P = 1,989: the dense Hessian fits
                 "fashion-all": ModelConfig(hidden=80, channels=(16, 32)),   # P = 54,693: ekfac and pcg
                 "custom": ModelConfig(hidden=16)}          # L2: config.DEFAULT_L2 (1e-2) on both stages
# Quick mode's fashion CNN: channels 4, 8 and 8 units (P = 1,989), within the exact solver and the dense
# retraining preconditioner, so --quick validates in minutes on a CPU. Its pretraining L2 is 5e-2, not 1e-2:
# removing one of m = 300 garments moves the Hessian by about 1/m = 3e-3, more than λ_min at 1e-2 (2.3e-4),
# so half the leave-one-out retrainings slid away from the trained minimum (14 of 27 counted per scenario on
# seed 0, slope 3.5); at 5e-2 λ_min is 8.2e-4 and 23-25 of 27 count (slope 0.9 fixed), for fixed-embedding
# accuracy 0.75 instead of 0.80 (updated 0.925 instead of 0.935; seed 0, docs/evidence.md).
QUICK_MODELS = {"fashion": ModelConfig(hidden=8, channels=(4, 8), pretrain_l2=5e-2)}
# Fashion finetunes on 80 per class (half held out as test): with 40, updated-scenario accuracy of the quick
# CNN was 0.87, with 80 0.935 (fixed 0.74 -> 0.76, so the frozen embedding still limits it: pretraining matters).
QUICK_CAPS = {"digits": (60, 40), "news": (40, 30), "fashion": (60, 80), "fashion-all": (400, 80),
              "custom": (60, 40)}   # per class: pretrain, finetune
# Full-mode caps where a preset's source is larger than its time budget (per class: pretrain, finetune):
# fashion pretrains on m = 5,000 of its 30,000 garments and finetunes on 40 per class (40 more held out).
# fashion-all keeps every pretraining garment (0: no cap).
FULL_CAPS = {"fashion": (1000, 80), "fashion-all": (0, 80)}
PRESET_DTYPES = {"fashion-all": "float32"}
"""dtype by preset when --dtype is not given (others: float64, which leave-one-out retraining needs)."""
@dataclass
class TaskData:
    """Both tasks' examples and their model inputs (float32 arrays, row i = example i; the
    pretraining inputs are ``LazyRows`` when its images are a memory map, see ``load_npy_images``)."""

    preset: str
    pretrain: LabelledExamples            # labels as trained on (noisy when label_noise > 0)
    finetune_train: LabelledExamples
    finetune_test: LabelledExamples
    pretrain_inputs: np.ndarray | LazyRows
    finetune_train_inputs: np.ndarray
    finetune_test_inputs: np.ndarray
    original_pretrain_labels: np.ndarray | None = None    # set when labels were flipped
    flipped: np.ndarray | None = None                     # bool [m]
    vectorizer: TextVectorizer | None = None

    @property
    def modality(self) -> str:
        return self.pretrain.modality


def load_source(spec: str, config: DataConfig) -> LabelledExamples:
    """A user data source: folder -> images, "IMAGES,LABELS" -> MNIST IDX (or two .npy arrays, kept on
    disk), .csv/.jsonl/.json/.tsv -> text."""
    if "," in spec:
        images, labels = (s.strip() for s in spec.split(",", 1))
        if images.lower().endswith(".npy"):
            return load_npy_images(images, labels)
        return load_mnist_idx(images, labels)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        return load_text_table(path, config.text_column, config.label_column)
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory; check the path")
    raise DataError(f"{spec}: unknown data format; give an image folder, a .csv/.jsonl text file, "
                    "or MNIST IDX files as IMAGES,LABELS")


def _split_tasks(config: DataConfig) -> tuple[LabelledExamples, LabelledExamples]:
    if config.preset == "digits":
        digits = load_digits_examples()
        return (select_classes(digits, ["0", "1", "2", "3", "4"], where="digits"),
                select_classes(digits, ["5", "6", "7", "8", "9"], where="digits"))
    if config.preset == "news":
        news = load_bbc_news(drop_duplicates=True)
        return (select_classes(news, NEWS_PRETRAIN_TOPICS, where="BBC News"),
                select_classes(news, NEWS_FINETUNE_TOPICS, where="BBC News"))
    if config.preset in FASHION_PRESETS:
        fashion = load_fashion_mnist(config.data_dir or None)
        return (select_classes(fashion, FASHION_PRETRAIN, where="Fashion-MNIST"),
                select_classes(fashion, FASHION_FINETUNE, where="Fashion-MNIST"))
    if config.preset != "custom":
        raise DataError(f"unknown preset {config.preset!r}; choose one of {', '.join(PRESETS)}")
    if not config.pretrain_data:
        raise DataError("--preset custom needs --pretrain-data (an image folder, a CSV/JSONL file or IDX files)")
    pre_source = load_source(config.pretrain_data, config)
    if config.finetune_data:
        fine_source = load_source(config.finetune_data, config)
        where_f = config.finetune_data
    else:
        if not (config.pretrain_classes and config.finetune_classes):
            raise DataError(f"{config.pretrain_data}: one source is split by classes; give both "
                            "--pretrain-classes and --finetune-classes (or --finetune-data)")
        fine_source, where_f = pre_source, config.pretrain_data
    if fine_source.modality != pre_source.modality:
        raise DataError(f"{where_f}: holds {fine_source.modality}s but {config.pretrain_data} holds "
                        f"{pre_source.modality}s; both tasks must use the same kind of input")
    pre = select_classes(pre_source, config.pretrain_classes, where=config.pretrain_data) \
        if config.pretrain_classes else pre_source
    fine = select_classes(fine_source, config.finetune_classes, where=where_f) \
        if config.finetune_classes else fine_source
    if pre.images is not None and pre.images.shape[1:] != fine.images.shape[1:]:
        raise DataError(f"{where_f}: images are {fine.images.shape[1:]} but pretraining images are "
                        f"{pre.images.shape[1:]}; resize them to one size")
    return pre, fine


PRESET_THREADS = {"fashion": 2, "fashion-all": 2}
"""torch CPU threads by preset when --threads is not given (others: 1). Measured on the quick fashion
CNN: a 256-column Hessian block took 7.2 s on one thread and 4.1 s on two; the MLPs gain nothing."""


def preset_threads(preset: str, ranks: int = 1) -> int:
    """Default torch threads of a preset's run: ``PRESET_THREADS``, at most the machine's cores shared
    by ``ranks`` processes (torchrun on one machine)."""
    return max(1, min(PRESET_THREADS.get(preset, 1), (os.cpu_count() or 1) // max(1, ranks)))


def cost_note(config: RunConfig, device_type: str) -> str | None:
    """One line to print before a run that is far costlier on ``device_type`` than the presets' usual
    minutes (the full fashion preset, and fashion-all's pcg check, on a CPU), saying what to run instead;
    None otherwise."""
    if config.data.preset == "fashion" and not config.quick and device_type == "cpu":
        return ("note: the full fashion preset (m = 5,000 garments, a CNN of 1,989 parameters, float64) trains for "
                "33-48 minutes on 2 CPU cores, and its retraining check 41-52 minutes more (74 minutes to 1h40m in all, "
                "seeds 0 and 1: docs/evidence.md; --no-validate skips the check); --quick takes 2-6 minutes, "
                "and --device cuda runs the full size faster")
    if config.data.preset == "fashion-all" and not config.quick and device_type == "cpu" \
            and config.influence.agreement_solver:
        return ("note: fashion-all scores 30,000 garments with ekfac in about 2 minutes on 2 CPU cores; its check "
                f"against {config.influence.agreement_solver} on {config.influence.agreement_points} test points "
                "takes about 14 more (seeds 0-2: docs/evidence.md); --agreement-solver '' skips it")
    return None


FULL_FASHION_SUBSAMPLE = 1000
"""Pretraining garments whose Hessian preconditions the full fashion run's Newton polish (its dense build
costs about 1/5 of the full one: 110 s measured instead of about 14 minutes on 2 cores;
``TrainConfig.newton_subsample``)."""


FULL_FASHION_GROUPS = (1.0,)
"""Group removal sizes of full fashion. 5% (250 garments) was dropped: those retrainings start at ‖∇‖ 0.62 and
2 of 42 models had converged after 36 of the 100 shared-preconditioner steps (each step a full-batch gradient
per model); a group that does not converge is left out of the group figures, so they cost half an hour for
nothing. Per-model Hessians (about 14 minutes each at m = 5,000) are out of reach."""


def full_config(config: RunConfig) -> RunConfig:
    """The full-size run of a preset where it differs from the dataclasses' defaults: fashion (m = 5,000)
    polishes with a subsample's Hessian (``FULL_FASHION_SUBSAMPLE``), builds its dense Hessians
    forward-over-reverse (0.47 s per column at m = 5,000 against 0.89 s double-backward; 2 cores, float64),
    and retrains with the one shared dense Hessian (a per-model one costs about 14 minutes) on 4 validation
    points, 4 removals per kind, groups of 1% (``FULL_FASHION_GROUPS``). L-BFGS keeps its 1e-5 hand-over:
    at 1e-3 (500-960 iterations) the CNN is still far from a minimum (the subsample's Hessian had λ_min
    −0.14 against λ_max 55 there; docs/evidence.md)."""
    if config.data.preset == "fashion-all":
        return fashion_all_config(config)
    if config.data.preset != "fashion" or config.quick:
        return config
    train = replace(config.train, newton_subsample=config.train.newton_subsample or FULL_FASHION_SUBSAMPLE,
                    hessian_products="forward-over-reverse")
    validation = replace(config.validation, n_test_points=4, k=4, group_percents=FULL_FASHION_GROUPS,
                         retrain_max_iter=QUICK_CNN_RETRAIN_ITERS, per_model_hessians=False)
    return replace(config, train=train, validation=validation, n_test_points=8)


FASHION_ALL_EPOCHS = 10
"""Minibatch Adam epochs of fashion-all's pretraining (128 garments per step, learning rate 3e-3 cosine-decayed)."""
FASHION_ALL_DAMPING = 1e-3
"""Damping of fashion-all's solves (on top of the L2's 1e-2): its pretraining is a damped stationary point,
not a certified minimum, so the scores answer the damped (proximal) question (docs/design.md)."""
FASHION_ALL_LBFGS_TOL = 1e-3
"""L-BFGS hands the finetunes (54,693 parameters in "updated") to Newton-CG at ‖∇‖ 1e-3: at float32's 1e-4 the
updated finetune spent its 3,000 L-BFGS iterations (4m20s at quick size), at 1e-3 240 iterations and a polish
(29 s); at 1e-2 (80 iterations) the polish once started too far out and ended beside a saddle, uncertified."""
FASHION_ALL_REFERENCE_TOL = 1e-2
"""Relative residual at which the reference pcg stops: each iteration is a pass over 30,000 garments per
right-hand side, and at quick size (2,000 garments, 2 test points, deflation 32) pcg needed 74 iterations to
reach 1e-3. The agreement records the residual reached."""
FASHION_ALL_DEFLATION = 32
"""Lanczos steps that complete pcg's EK-FAC preconditioner (``SolverConfig.deflation``; 128 by default)."""
FASHION_ALL_AGREEMENT_POINTS = 2
"""Test points of fashion-all that pcg re-scores to check ekfac (two right-hand sides each, one per scenario,
each a CG solve over 30,000 garments)."""


FASHION_ALL_CLEAN_PERCENTS = (2.0,)
"""Clean-and-retrain removal sizes of fashion-all (--clean, --label-noise): each row trains the chain again
(``precompute.scratch_retraining``), so one size keeps the check to about ten chains."""


def fashion_all_config(config: RunConfig) -> RunConfig:
    """fashion-all's settings (full and quick): float32 training tolerances, minibatch pretraining, ekfac
    on the Gauss-Newton curvature with ``FASHION_ALL_DAMPING`` for both solves' damping (the updated
    finetune's system on the Gauss-Newton curvature too: positive definite even where float32 training
    stops beside a saddle, which then shows as an uncertified stage in the summary, not a failed run),
    pcg re-scoring the first ``FASHION_ALL_AGREEMENT_POINTS`` test points, 16 scored test points, no retraining check (it
    would retrain a 54,693-parameter CNN on 30,000 garments per removal)."""
    train = replace(config.train, minibatch_epochs=config.train.minibatch_epochs or FASHION_ALL_EPOCHS,
                    lbfgs_tol=FASHION_ALL_LBFGS_TOL)
    solver = SolverConfig(name="ekfac", damping=FASHION_ALL_DAMPING, curvature="ggn",
                          tol=FASHION_ALL_REFERENCE_TOL, deflation=FASHION_ALL_DEFLATION)
    influence = replace(config.influence, pretrain_solver=solver,
                        finetune_solver=replace(config.influence.finetune_solver, damping=FASHION_ALL_DAMPING,
                                                deflation=FASHION_ALL_DEFLATION, curvature="ggn"),
                        agreement_solver="pcg", agreement_points=FASHION_ALL_AGREEMENT_POINTS)
    cleaning = replace(config.cleaning, percents=FASHION_ALL_CLEAN_PERCENTS)
    return replace(config, train=train, influence=influence, validate=False, n_test_points=16, cleaning=cleaning)


QUICK_FASHION_GROUPS: tuple[float, ...] = ()
"""Group removal sizes of quick fashion: none. At m = 300 no helpful or harmful 5% or 10% group removal
converged (seeds 0-4), and the groups were half the retrained models, so half the check's time."""

NOISY_PRETRAIN_L2 = {"digits": 2.5e-2}
"""Pretraining L2 by preset when ``--label-noise`` flips labels and ``--pretrain-l2`` is not given. At 1e-2 the
digits MLP memorises its 10% flipped labels at a shallow minimum (λ_min 2.9e-5 on seed 0, against the ~1/m = 1e-3
a removal moves the Hessian by), so 10 of 27 leave-one-out retrainings slid to another basin and the updated
scenario checked at Pearson 0.940 [0.726, 0.988] over seeds 0-4. At 2.5e-2 (λ_min 7e-4 on seed 0) it checks at
0.975 [0.714, 0.999] over seeds 0-9 (two below 0.9: removals of memorised labels still jump basins); the price is
less memorisation: fixed-embedding accuracy 0.754 -> 0.672 and the multi-stage total-harm AUC for the flipped
labels 0.986 -> 0.954 on seed 0 (5e-2 cost more, 0.636 and 0.913, and still jumped on seed 7; docs/evidence.md)."""


def noisy_config(config: RunConfig) -> RunConfig:
    """A run with flipped labels pretrains with ``NOISY_PRETRAIN_L2`` where its preset has one."""
    l2 = NOISY_PRETRAIN_L2.get(config.data.preset)
    if config.data.label_noise <= 0 or l2 is None:
        return config
    return replace(config, model=replace(config.model, pretrain_l2=l2))


QUICK_CNN_RETRAIN_ITERS = 100
"""Retraining steps of the quick CNN, all with the shared preconditioner (no per-model Hessians). 300 did
not help: at 156 steps the same 24 of 62 pretraining retrainings had converged as at 100, the others had
slid far from the trained minimum (‖∇‖ 1.6e-2)."""


def quick_config(config: RunConfig) -> RunConfig:
    """Quick mode (``--quick``), the one place it is defined: small sizes for smoke tests and CI
    (digits and news well under a minute, fashion 2-6 minutes on 2 CPU cores, by seed and CPU). Per-class caps on both
    tasks (``QUICK_CAPS``, where no cap is set), the smaller fashion CNN (``QUICK_MODELS``), 6 scored
    test points, a 3-point retraining check and 3-fold cleaning."""
    if config.data.preset == "fashion-all":
        config = fashion_all_config(config)
    pre, fine = QUICK_CAPS[config.data.preset]
    quick_model = QUICK_MODELS.get(config.data.preset)
    model = replace(config.model, hidden=quick_model.hidden, channels=quick_model.channels,
                    pretrain_l2=quick_model.pretrain_l2) if quick_model else config.model
    # The quick CNN's Hessian products are slow (a dense Hessian: ~60 s on 2 cores), so its polish is
    # Hessian-free Newton-CG and the one dense Hessian per stage is the certificate's (shared with influence).
    # Its dense Hessians are built forward-over-reverse (13 ms per product against 23 ms double-backward).
    train = replace(config.train, dense_polish_max_params=0, hessian_products="forward-over-reverse") \
        if quick_model else config.train
    data = replace(config.data, max_pretrain=config.data.max_pretrain or pre,
                   max_finetune=config.data.max_finetune or fine)
    # The fashion CNN's stragglers would each build a dense Hessian (1,989 products, ~35 s) after the 100
    # shared steps (``retraining.SHARED_ITERS``): quick mode flags them instead (docs/evidence.md).
    retrain_iters = QUICK_CNN_RETRAIN_ITERS if quick_model else config.validation.retrain_max_iter
    return replace(config, quick=True, data=data, model=model, train=train, n_test_points=6,
                   validation=replace(config.validation, n_test_points=3, k=3,
                                      group_percents=QUICK_FASHION_GROUPS if quick_model else (5.0, 10.0),
                                      retrain_max_iter=retrain_iters,
                                      per_model_hessians=config.validation.per_model_hessians and not quick_model),
                   cleaning=replace(config.cleaning, folds=3,
                                    percents=config.cleaning.percents if config.data.preset == "fashion-all"
                                    else (5.0, 10.0)))


def load_task_data(config: DataConfig, model: ModelConfig) -> TaskData:
    """Loads, splits, caps, injects label noise and featurises. Raises DataError on bad input."""
    pre, fine = _split_tasks(config)
    cap_pre, cap_fine = config.max_pretrain, config.max_finetune
    full_pre, full_fine = FULL_CAPS.get(config.preset, (0, 0))
    cap_pre, cap_fine = cap_pre or full_pre, cap_fine or full_fine
    if cap_pre:
        pre = subsample_per_class(pre, cap_pre, config.seed)
    if cap_fine:
        fine = subsample_per_class(fine, cap_fine, config.seed)
    fine_train, fine_test = split_train_test(fine, config.finetune_test_fraction, config.seed)

    original = flipped = None
    if config.label_noise > 0:
        noisy, flipped = flip_labels(pre.labels, config.label_noise, len(pre.class_names), config.seed)
        original = pre.labels.copy()
        pre = replace(pre, labels=noisy)

    vectorizer = None
    if pre.modality == "image":
        on_disk = isinstance(pre.images, np.memmap)           # stays there: featurised a chunk at a time
        inputs = [LazyRows(pre.images, transform=image_features) if on_disk else image_features(pre.images),
                  image_features(fine_train.images), image_features(fine_test.images)]
    else:
        vectorizer = TextVectorizer().fit(list(pre.texts) + list(fine_train.texts),
                                          max_features=model.vocabulary, min_df=2)
        inputs = [vectorizer.transform(list(e.texts)) for e in (pre, fine_train, fine_test)]
    return TaskData(config.preset, pre, fine_train, fine_test, *inputs, original, flipped, vectorizer)


def build_task(data: TaskData, model: ModelConfig, seed: int = 0) -> TwoStageTask:
    """Embedding Flatten -> Linear(d, hidden) -> tanh (fashion: ``models.fashion_cnn``); linear heads for
    each task (float32, CPU)."""
    torch.manual_seed(seed)
    d_in = int(np.prod(data.pretrain_inputs.shape[1:]))
    embedding = fashion_cnn(model.hidden, tuple(model.channels)) if data.preset in FASHION_PRESETS else \
        nn.Sequential(nn.Flatten(), nn.Linear(d_in, model.hidden), nn.Tanh())
    pre_head = nn.Linear(model.hidden, len(data.pretrain.class_names))
    fine_head = nn.Linear(model.hidden, len(data.finetune_train.class_names))

    def tensors(x: np.ndarray | LazyRows, ex: LabelledExamples) -> tuple[torch.Tensor | LazyRows, torch.Tensor]:
        inputs = x if isinstance(x, LazyRows) else torch.from_numpy(np.ascontiguousarray(x))
        return inputs, torch.from_numpy(ex.labels.astype(np.int64))

    return TwoStageTask(embedding, pre_head, fine_head,
                        *tensors(data.pretrain_inputs, data.pretrain),
                        *tensors(data.finetune_train_inputs, data.finetune_train),
                        *tensors(data.finetune_test_inputs, data.finetune_test),
                        pretrain_l2=model.pretrain_l2, finetune_l2=model.finetune_l2)
