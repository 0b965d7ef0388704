"""The precompute pipeline end to end: presets, users' files, bad input, atomic writing, determinism."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from precompute.cli import main
from precompute.pipeline import choose_test_points
from precompute.runstore import list_runs, open_run


def test_quick_presets_write_valid_runs_with_retraining_evidence(quick_runs):
    root, names = quick_runs
    assert sorted(list_runs(root)) == sorted(names.values())
    for modality, name in names.items():
        run = open_run(root, name)
        m = run.manifest
        assert m["modality"] == modality and m["scenarios"] == ["fixed", "updated"]
        assert run.scores("fixed").shape == (len(m["test_points"]), m["n_pretrain"])
        for s in m["scenarios"]:
            v = m["validation"][s]
            # measured on clean quick runs: Pearson 0.95-0.99; finetune accuracy 0.71-0.97
            assert v["n_pairs"] > 0 and v["pearson"] > 0.5, (name, s, v)
            assert m["finetune_accuracy"][s] > 1 / len(m["finetune_class_names"]) + 0.1    # above chance
        assert set(m["baselines"]) >= {"pretrain_loss", "predictive_entropy", "grad_dot", "grad_cosine",
                                       "embedding_similarity", "single_stage"}
        assert {"train", "influence", "validation"} <= set(m["timings_s"])
        assert m["diagnostics"]["fixed"]["pretrain_solve"]["relative_residual"] < 1e-6
    assert open_run(root, names["image"]).manifest["label_noise"]["n_flipped"] > 0


def test_removing_the_top_helpful_example_raises_the_test_loss(quick_runs):
    """The stored actual changes come from real retraining: signs follow the predictions."""
    root, names = quick_runs
    pairs = open_run(root, names["image"]).pairs()
    helpful = pairs.loc[pairs[pairs.kind == "helpful"].groupby(["scenario", "test_id"]).predicted.idxmax()]
    harmful = pairs.loc[pairs[pairs.kind == "harmful"].groupby(["scenario", "test_id"]).predicted.idxmin()]
    assert (helpful.predicted > 0).all() and (harmful.predicted < 0).all()
    assert (helpful.actual > 0).all() and (harmful.actual < 0).all()
    assert pairs.converged.mean() >= 0.9
    random = pairs[pairs.kind == "random"]
    # Random removals move the loss far less than the top-ranked ones.
    assert random.actual.abs().median() < helpful.actual.abs().median()


@pytest.mark.slow
def test_same_seed_gives_the_same_scores(tmp_path):
    args = ["--preset", "digits", "--quick", "--no-validate", "--n-test", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    for s in ("fixed", "updated"):
        np.testing.assert_array_equal(np.load(tmp_path / "a/scores" / f"{s}.npy"),
                                      np.load(tmp_path / "b/scores" / f"{s}.npy"))


@pytest.mark.slow
def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    import precompute.pipeline as pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.MultiStageInfluence, "scores", interrupt)
    assert main(["--preset", "digits", "--quick", "--no-validate", "--out", str(tmp_path / "run")]) == 130
    assert list(tmp_path.iterdir()) == []
    assert "nothing was written" in capsys.readouterr().err


def test_existing_run_is_kept_without_overwrite(quick_runs, capsys):
    root, names = quick_runs
    before = (root / names["text"] / "manifest.json").read_text()
    assert main(["--preset", "news", "--quick", "--out", str(root / names["text"])]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (root / names["text"] / "manifest.json").read_text() == before


def test_default_test_points_cover_every_class_right_and_wrong():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 5)
    correct = np.array([True, False] * 7 + [True])
    chosen = choose_test_points(labels, correct, 6)
    assert len(set(chosen)) == 6
    assert set(labels[chosen]) == {0, 1, 2}
    for c in range(3):
        picked = [i for i in chosen if labels[i] == c]
        assert {bool(correct[i]) for i in picked} == {True, False}


# ---- users' own data ----------------------------------------------------------------------------

def _digits(n_per_class: int = 25):
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:n_per_class] for c in range(6)])
    return (d.images[keep] * 15).astype(np.uint8), d.target[keep]


def _custom(tmp_path, *extra) -> list[str]:
    return ["--preset", "custom", "--quick", "--no-validate", "--n-test", "4", "--out",
            str(tmp_path / "out"), *extra]


@pytest.mark.slow
def test_image_folder(tmp_path):
    images, labels = _digits()
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = tmp_path / "imgs" / f"d{y}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    assert main(_custom(tmp_path, "--pretrain-data", str(tmp_path / "imgs"),
                        "--pretrain-classes", "d0,d1,d2", "--finetune-classes", "d3,d4,d5")) == 0
    run = open_run(tmp_path, "out")
    assert run.manifest["modality"] == "image" and run.manifest["finetune_class_names"] == ["d3", "d4", "d5"]
    assert run.pretrain_images().shape[1:] == (8, 8)


def _idx(path, magic: int, array: np.ndarray, compress: bool) -> None:
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.slow
def test_mnist_idx_files(tmp_path):
    images, labels = _digits()
    _idx(tmp_path / "img.idx.gz", 2051, images, True)
    _idx(tmp_path / "lab.idx", 2049, labels.astype(np.uint8), False)
    assert main(_custom(tmp_path, "--pretrain-data", f"{tmp_path}/img.idx.gz,{tmp_path}/lab.idx",
                        "--pretrain-classes", "0,1,2", "--finetune-classes", "3,4,5")) == 0
    assert open_run(tmp_path, "out").manifest["pretrain_class_names"] == ["0", "1", "2"]


def _digit_classes(classes, n_per_class: int):
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:n_per_class] for c in classes])
    return (d.images[keep] * 15).astype(np.uint8), d.target[keep]


@pytest.mark.slow
def test_npy_pretraining_set_is_streamed_from_disk_and_scores_as_in_memory(tmp_path):
    """IMAGES.npy,LABELS.npy stay memory-mapped (training, solve and scoring in chunks, scores
    streamed into the run); the same examples given as IDX files (read into memory) score the same."""
    pre_x, pre_y = _digit_classes(range(5), 40)
    fine_x, fine_y = _digit_classes(range(5, 10), 20)
    np.save(tmp_path / "pre_x.npy", pre_x), np.save(tmp_path / "pre_y.npy", pre_y)
    np.save(tmp_path / "fine_x.npy", fine_x), np.save(tmp_path / "fine_y.npy", fine_y)
    _idx(tmp_path / "pre_x.idx", 2051, pre_x, False)
    _idx(tmp_path / "pre_y.idx", 2049, pre_y.astype(np.uint8), False)
    common = ["--preset", "custom", "--no-validate", "--n-test", "4", "--finetune-data",
              f"{tmp_path}/fine_x.npy,{tmp_path}/fine_y.npy"]
    assert main([*common, "--pretrain-data", f"{tmp_path}/pre_x.npy,{tmp_path}/pre_y.npy",
                 "--out", str(tmp_path / "runs" / "disk")]) == 0
    assert main([*common, "--pretrain-data", f"{tmp_path}/pre_x.idx,{tmp_path}/pre_y.idx",
                 "--out", str(tmp_path / "runs" / "memory")]) == 0
    disk, memory = open_run(tmp_path / "runs", "disk"), open_run(tmp_path / "runs", "memory")
    assert disk.manifest["config"]["scores_to_disk"] and not memory.manifest["config"]["scores_to_disk"]
    assert disk.test_points == memory.test_points
    np.testing.assert_array_equal(disk.pretrain_images(), pre_x)
    for scenario in disk.scenarios:
        want = memory.scores(scenario)
        np.testing.assert_allclose(disk.scores(scenario), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_npy_pretraining_set_needs_no_validate(tmp_path, capsys):
    pre_x, pre_y = _digit_classes(range(3), 10)
    np.save(tmp_path / "x.npy", pre_x), np.save(tmp_path / "y.npy", pre_y)
    assert main(["--preset", "custom", "--pretrain-data", f"{tmp_path}/x.npy,{tmp_path}/y.npy",
                 "--finetune-data", f"{tmp_path}/x.npy,{tmp_path}/y.npy", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--no-validate" in err and "\n" not in err
    assert list(tmp_path.glob("*out*")) == [] and not list(tmp_path.glob(".out*"))
    np.save(tmp_path / "bad.npy", pre_x.astype(np.float32))
    assert "uint8" in _bad(tmp_path, capsys, "--pretrain-data", f"{tmp_path}/bad.npy,{tmp_path}/y.npy",
                           "--finetune-data", f"{tmp_path}/x.npy,{tmp_path}/y.npy")


def _news_rows(topics: tuple[str, ...], per_topic: int = 20):
    from precompute.data import load_bbc_news
    news = load_bbc_news()
    rows = []
    for t in topics:
        idx = [i for i, y in enumerate(news.labels) if news.class_names[y] == t][:per_topic]
        rows += [{"body": news.texts[i], "topic": t} for i in idx]
    return rows


@pytest.mark.slow
def test_csv_and_jsonl_text_files(tmp_path):
    import pandas as pd
    pd.DataFrame(_news_rows(("business", "politics", "tech"))).to_csv(tmp_path / "pre.csv", index=False)
    with open(tmp_path / "fine.jsonl", "w", encoding="utf-8") as f:
        for row in _news_rows(("sports", "entertainment")):
            f.write(json.dumps(row) + "\n")
    assert main(_custom(tmp_path, "--pretrain-data", str(tmp_path / "pre.csv"), "--finetune-data",
                        str(tmp_path / "fine.jsonl"), "--text-column", "body", "--label-column", "topic")) == 0
    run = open_run(tmp_path, "out")
    assert run.manifest["modality"] == "text"
    assert run.pretrain_table()["text"].str.len().min() > 0


# ---- bad input: one line naming the file and the fix, nothing written ------------------------------

def _bad(tmp_path, capsys, *extra) -> str:
    assert main(_custom(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return err


def test_missing_path(tmp_path, capsys):
    assert "nope" in _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "nope"),
                          "--finetune-data", str(tmp_path / "nope"))


def test_unreadable_image(tmp_path, capsys):
    for c in ("a", "b", "c", "d"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / c / "ok.png")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    assert "broken.png" in _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "imgs"),
                                "--pretrain-classes", "a,b", "--finetune-classes", "c,d")


def test_mixed_image_sizes(tmp_path, capsys):
    for c, size in (("a", 8), ("b", 9)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("L", (size, size)).save(tmp_path / "imgs" / c / "x.png")
    assert "resize" in _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "imgs"),
                            "--pretrain-classes", "a", "--finetune-classes", "b")


def test_class_with_no_examples(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("text,label\nhello world,a\nbye now,b\nmore text,c\n", encoding="utf-8")
    err = _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "t.csv"),
               "--pretrain-classes", "a,b", "--finetune-classes", "c,zzz")
    assert "zzz" in err and "t.csv" in err


def test_non_utf8_empty_and_unknown_column(tmp_path, capsys):
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\nx,b\n".encode("latin-1"))
    assert "UTF-8" in _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "latin.csv"),
                           "--finetune-data", str(tmp_path / "latin.csv"))
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    assert "empty.csv" in _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "empty.csv"),
                               "--finetune-data", str(tmp_path / "empty.csv"))
    (tmp_path / "cols.csv").write_text("body,label\nx,a\ny,b\n", encoding="utf-8")
    assert "--text-column" in _bad(tmp_path, capsys, "--pretrain-data", str(tmp_path / "cols.csv"),
                                   "--finetune-data", str(tmp_path / "cols.csv"))


def test_test_id_out_of_range(tmp_path, capsys):
    assert main(["--preset", "digits", "--quick", "--no-validate", "--test-ids", "0,9999",
                 "--out", str(tmp_path / "out")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_check_command_passes():
    assert main(["check"]) == 0


@pytest.mark.slow
def run_certificate_fields_present(root) -> bool:
    training = open_run(root, "early").manifest["diagnostics"]["fixed"]["training"]["pretrain"]
    return not training["certified"] and training["eig_min"] is not None and "grad_floor" in training


def test_stopping_training_early_is_flagged_in_the_summary(tmp_path, capsys):
    assert main(["--preset", "digits", "--quick", "--no-validate", "--train-iters", "5", "--newton-steps", "0",
                 "--damping", "1", "--out", str(tmp_path / "early")]) == 0
    out = capsys.readouterr().out
    assert "warning: pretraining stopped before a certified minimum" in out and "raise --train-iters" in out
    assert "λ_min = " in out and "proximal question" in out
    assert run_certificate_fields_present(tmp_path)
    run = open_run(tmp_path, "early")
    assert run.manifest["diagnostics"]["fixed"]["training"]["pretrain"]["iterations"] <= 5


@pytest.mark.slow
def test_an_uncertified_stage_stops_the_run_in_one_line_and_writes_nothing(tmp_path, capsys):
    """Training cut short (5 iterations, no polish) and an undamped solve: the run refuses before any
    solver, names the stage, its ‖∇‖ and λ_min and what to change, and leaves no run directory."""
    code = main(["--preset", "digits", "--quick", "--no-validate", "--train-iters", "5", "--newton-steps", "0",
                 "--out", str(tmp_path / "cut")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "cut").exists()
    assert err[-1].startswith("error: pretraining is not at a certified minimum (‖∇‖ = ")
    assert "--train-iters" in err[-1]
