"""Tests for precompute.data: real bundled data and real files written to tmp_path (no mocks)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.data import (
    DataError,
    LabelledExamples,
    TextVectorizer,
    flip_labels,
    image_features,
    load_bbc_news,
    load_digits_examples,
    load_image_folder,
    load_mnist_idx,
    load_text_table,
    select_classes,
    split_train_test,
    subsample_per_class,
)

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def digits() -> LabelledExamples:
    return load_digits_examples()


@pytest.fixture(scope="module")
def bbc() -> LabelledExamples:
    return load_bbc_news()


def _one_line_error(excinfo: pytest.ExceptionInfo[DataError], *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- bundled data


def test_digits_loads_real_images(digits: LabelledExamples) -> None:
    assert len(digits) == 1797
    assert digits.modality == "image"
    assert digits.images is not None and digits.images.shape == (1797, 8, 8)
    assert digits.images.dtype == np.uint8 and digits.images.max() == 255 and digits.images.min() == 0
    assert digits.class_names == tuple(str(i) for i in range(10))
    assert digits.labels.dtype == np.int64
    assert np.array_equal(np.unique(digits.labels), np.arange(10))
    assert digits.sources[17] == "digits#17"
    assert digits.texts is None


def test_bbc_news_loads_all_articles(bbc: LabelledExamples) -> None:
    assert len(bbc) == 2225
    assert bbc.modality == "text"
    assert bbc.class_names == BBC_TOPICS
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert bbc.sources[0] == "bbc/business/001.txt"
    assert bbc.texts is not None
    headline, body = bbc.texts[0].split("\n", 1)
    assert headline == "Ad sales boost Time Warner profit"
    assert body.startswith("Quarterly profits at US media giant TimeWarner")
    assert "\n\n" not in bbc.texts[0]
    # sports/199.txt is latin-1, not UTF-8: the pound sign must survive the fallback.
    latin = bbc.texts[bbc.sources.index("bbc/sports/199.txt")]
    assert latin.startswith("Chelsea sack Mutu\n") and "\u00a315.8m" in latin


def test_bbc_news_subsample_and_dedup() -> None:
    small = load_bbc_news(max_per_class=20, seed=3)
    assert np.bincount(small.labels).tolist() == [20] * 5
    assert small.sources == load_bbc_news(max_per_class=20, seed=3).sources
    assert small.sources != load_bbc_news(max_per_class=20, seed=4).sources
    unique = load_bbc_news(drop_duplicates=True)
    assert unique.texts is not None and len(set(unique.texts)) == len(unique) < 2225


# --------------------------------------------------------------------------- image folder


def _save(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_grayscale(tmp_path: Path) -> None:
    a = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    b = 255 - a
    _save(tmp_path / "dog" / "d1.png", b, "L")
    _save(tmp_path / "cat" / "c2.bmp", a, "L")
    _save(tmp_path / "cat" / "c1.png", b, "L")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "cat" / "._c1.png").write_bytes(b"macOS metadata, not an image")

    ex = load_image_folder(tmp_path)
    assert ex.class_names == ("cat", "dog")
    assert ex.sources == ("cat/c1.png", "cat/c2.bmp", "dog/d1.png")
    assert ex.labels.tolist() == [0, 0, 1]
    assert ex.images is not None and ex.images.shape == (3, 4, 5) and ex.images.dtype == np.uint8
    assert np.array_equal(ex.images[0], b) and np.array_equal(ex.images[1], a)


def test_image_folder_rgb_when_any_image_is_colour(tmp_path: Path) -> None:
    gray = np.full((3, 3), 77, dtype=np.uint8)
    rgb = np.zeros((3, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    _save(tmp_path / "a" / "g.png", gray, "L")
    _save(tmp_path / "b" / "c.png", rgb, "RGB")
    ex = load_image_folder(tmp_path)
    assert ex.images is not None and ex.images.shape == (2, 3, 3, 3)
    assert (ex.images[0] == 77).all()
    assert np.array_equal(ex.images[1], rgb)


def test_image_folder_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path / "nowhere")
    _one_line_error(e, "nowhere", "no such folder")


def test_image_folder_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path / "file.png")
    _one_line_error(e, "file.png", "not a folder")


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    _save(tmp_path / "loose.png", np.zeros((2, 2), np.uint8), "L")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    _one_line_error(e, str(tmp_path), "no class folders")


def test_image_folder_class_without_images(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "c.png", np.zeros((2, 2), np.uint8), "L")
    (tmp_path / "emptyclass").mkdir()
    (tmp_path / "emptyclass" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    _one_line_error(e, "emptyclass", "no images")


@pytest.mark.parametrize("content", [b"this is not a png", None], ids=["garbage", "truncated"])
def test_image_folder_unreadable_image(tmp_path: Path, content: bytes | None) -> None:
    _save(tmp_path / "cat" / "ok.png", np.zeros((8, 8), np.uint8), "L")
    _save(tmp_path / "dog" / "ok.png", np.zeros((8, 8), np.uint8), "L")
    broken = tmp_path / "dog" / "broken.png"
    if content is None:
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        _save(broken, noise, "L")
        content = broken.read_bytes()[:200]  # valid header, cut-off pixel data
    broken.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    _one_line_error(e, str(broken), "cannot read image", "remove or replace")


def test_image_folder_mixed_sizes(tmp_path: Path) -> None:
    for name in ("a1.png", "a2.png"):
        _save(tmp_path / "a" / name, np.zeros((4, 6), np.uint8), "L")
    _save(tmp_path / "b" / "b1.png", np.zeros((4, 6), np.uint8), "L")
    _save(tmp_path / "b" / "odd.png", np.zeros((5, 5), np.uint8), "L")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    _one_line_error(e, "odd.png", "a1.png", "5x5", "resize all images to one size, e.g. 4x6")


def test_image_folder_needs_two_classes(tmp_path: Path) -> None:
    _save(tmp_path / "only" / "x.png", np.zeros((2, 2), np.uint8), "L")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    _one_line_error(e, "only", "at least 2")


# --------------------------------------------------------------------------- MNIST IDX


def _idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: list[int], magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


IDX_IMAGES = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2) * 7
IDX_LABELS = [3, 0, 9, 3, 0]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    suffix = ".gz" if gz else ""
    wrap = gzip.compress if gz else (lambda b: b)
    img, lab = tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / f"train-labels-idx1-ubyte{suffix}"
    img.write_bytes(wrap(_idx_images(IDX_IMAGES)))
    lab.write_bytes(wrap(_idx_labels(IDX_LABELS)))
    ex = load_mnist_idx(img, lab)
    assert ex.images is not None and ex.images.dtype == np.uint8
    assert np.array_equal(ex.images, IDX_IMAGES)
    assert ex.class_names == ("0", "3", "9")
    assert [ex.class_names[i] for i in ex.labels] == ["3", "0", "9", "3", "0"]
    assert ex.sources[4] == f"{img.name}#4"


def test_mnist_idx_errors(tmp_path: Path) -> None:
    img, lab = tmp_path / "imgs.idx", tmp_path / "labs.idx"
    img.write_bytes(_idx_images(IDX_IMAGES))
    lab.write_bytes(_idx_labels(IDX_LABELS))

    with pytest.raises(DataError) as e:
        load_mnist_idx(tmp_path / "missing-images", lab)
    _one_line_error(e, "missing-images", "no such file")

    bad = tmp_path / "badmagic.idx"
    bad.write_bytes(_idx_images(IDX_IMAGES, magic=1234))
    with pytest.raises(DataError) as e:
        load_mnist_idx(bad, lab)
    _one_line_error(e, "badmagic.idx", "bad magic number 1234", "2051")

    with pytest.raises(DataError) as e:  # paths swapped
        load_mnist_idx(lab, img)
    _one_line_error(e, "labs.idx", "labels file")

    short = tmp_path / "short.idx"
    short.write_bytes(_idx_images(IDX_IMAGES)[:-3])
    with pytest.raises(DataError) as e:
        load_mnist_idx(short, lab)
    _one_line_error(e, "short.idx", "truncated")

    few = tmp_path / "few-labels.idx"
    few.write_bytes(_idx_labels(IDX_LABELS[:4]))
    with pytest.raises(DataError) as e:
        load_mnist_idx(img, few)
    _one_line_error(e, "few-labels.idx", "5 images", "4 labels")


# --------------------------------------------------------------------------- text tables


def test_csv_table(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(
        "\ufeffid,text,label\n"
        '1,"Great, really great",pos\n'
        "2,awful film,neg\n"
        '3,"two\nlines",pos\n',
        encoding="utf-8",
    )
    ex = load_text_table(path)
    assert ex.texts == ("Great, really great", "awful film", "two\nlines")
    assert ex.class_names == ("neg", "pos")
    assert ex.labels.tolist() == [1, 0, 1]
    assert ex.sources == ("train.csv:row 1", "train.csv:row 2", "train.csv:row 3")


def test_jsonl_table_custom_columns_numeric_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"body": "héllo wörld", "y": 10}, {"body": "second", "y": 2}, {"body": "third", "y": "2"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    ex = load_text_table(path, text_column="body", label_column="y")
    assert ex.texts == ("héllo wörld", "second", "third")
    assert ex.class_names == ("2", "10")  # integer labels sort numerically
    assert ex.labels.tolist() == [1, 0, 0]
    assert ex.sources[1] == "data.jsonl:line 2"


def test_text_table_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_text_table(tmp_path / "nope.csv")
    _one_line_error(e, "nope.csv", "no such file")


def test_text_table_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,a\nok,b\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_text_table(path)
    _one_line_error(e, "latin.csv", "not valid UTF-8 at byte 14", "line 2", "re-save the file as UTF-8")


@pytest.mark.parametrize("content", ["", "\n  \n", "text,label\n"], ids=["empty", "blank", "header-only"])
def test_text_table_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_text_table(path)
    _one_line_error(e, "empty.csv", "empty")


def test_text_table_unknown_column(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("sentence,label\nhi,a\nyo,b\n")
    with pytest.raises(DataError) as e:
        load_text_table(path, text_column="txt")
    _one_line_error(e, "cols.csv", "no column 'txt'", "columns are: sentence, label", "--text-column")
    with pytest.raises(DataError) as e:
        load_text_table(path, text_column="sentence", label_column="class")
    _one_line_error(e, "cols.csv", "no column 'class'", "--label-column")

    jpath = tmp_path / "cols.jsonl"
    jpath.write_text('{"sentence": "hi", "label": "a"}\n')
    with pytest.raises(DataError) as e:
        load_text_table(jpath)
    _one_line_error(e, "cols.jsonl", "no column 'text'", "columns are: sentence, label")


def test_text_table_empty_text_row(tmp_path: Path) -> None:
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\nfine,a\n  ,b\n")
    with pytest.raises(DataError) as e:
        load_text_table(path)
    _one_line_error(e, "gaps.csv", "row 2", "empty text")


def test_text_table_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    with pytest.raises(DataError) as e:
        load_text_table(path)
    _one_line_error(e, "broken.jsonl", "line 3", "invalid JSON")


# --------------------------------------------------------------------------- label operations


def test_labelled_examples_validation() -> None:
    with pytest.raises(DataError):
        LabelledExamples(labels=np.array([0, 2]), class_names=("a", "b"), sources=("x", "y"), texts=("1", "2"))
    with pytest.raises(DataError):
        LabelledExamples(labels=np.array([0]), class_names=("a",), sources=("x",))
    with pytest.raises(DataError):
        LabelledExamples(labels=np.array([0]), class_names=("a",), sources=("x", "y"), texts=("t",))
    ex = LabelledExamples(labels=[1, 0, 1], class_names=("a", "b"), sources=("p", "q", "r"), texts=("1", "2", "3"))
    sub = ex.subset([2, 0])
    assert sub.labels.dtype == np.int64 and sub.labels.tolist() == [1, 1]
    assert sub.texts == ("3", "1") and sub.sources == ("r", "p") and sub.class_names == ("a", "b")
    assert ex.subset(np.array([True, False, True])).sources == ("p", "r")


def test_select_classes(digits: LabelledExamples) -> None:
    sub = select_classes(digits, ["7", 1])
    assert sub.class_names == ("7", "1")
    assert len(sub) == int((digits.labels == 7).sum() + (digits.labels == 1).sum())
    assert set(sub.labels.tolist()) == {0, 1}
    assert sub.images is not None
    first7 = int(np.flatnonzero(digits.labels == 7)[0])
    assert sub.labels[sub.sources.index(f"digits#{first7}")] == 0

    ex = LabelledExamples(labels=[0, 1, 2, 0], class_names=("cat", "dog", "5"), sources="abcd", texts=tuple("wxyz"))
    assert select_classes(ex, ["5"]).class_names == ("5",)  # a digit string matches a name first
    assert select_classes(ex, ["1", "cat"]).class_names == ("dog", "cat")  # else an id
    with pytest.raises(DataError) as e:
        select_classes(ex, ["cow"], where="animals.csv")
    _one_line_error(e, "unknown class 'cow' in animals.csv", "known: cat, dog, 5")
    empty = LabelledExamples(labels=[0, 0], class_names=("cat", "dog"), sources="ab", texts=("x", "y"))
    with pytest.raises(DataError) as e:
        select_classes(empty, ["dog"])
    _one_line_error(e, "'dog' has no examples")


def test_split_is_stratified_and_deterministic(digits: LabelledExamples) -> None:
    train, test = split_train_test(digits, 0.25, seed=0)
    assert len(train) + len(test) == len(digits)
    assert not set(train.sources) & set(test.sources)
    per_class = np.bincount(digits.labels)
    assert np.abs(np.bincount(test.labels) - np.round(0.25 * per_class)).max() == 0
    again_train, again_test = split_train_test(digits, 0.25, seed=0)
    assert again_test.sources == test.sources and again_train.sources == train.sources
    assert split_train_test(digits, 0.25, seed=1)[1].sources != test.sources
    with pytest.raises(DataError):
        split_train_test(digits, 1.0, seed=0)


def test_flip_labels_exact_count_never_same_class() -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=1001)
    original = labels.copy()
    new, flipped = flip_labels(labels, 0.3, n_classes=4, seed=5)
    assert flipped.sum() == round(0.3 * 1001)
    assert (new[flipped] != labels[flipped]).all()
    assert (new[~flipped] == labels[~flipped]).all()
    assert new.min() >= 0 and new.max() < 4 and new.dtype == np.int64
    assert np.array_equal(labels, original)
    new2, flipped2 = flip_labels(labels, 0.3, n_classes=4, seed=5)
    assert np.array_equal(new, new2) and np.array_equal(flipped, flipped2)
    # Targets are spread over all the other classes, not a fixed permutation.
    assert len({(a, b) for a, b in zip(labels[flipped], new[flipped])}) == 12
    assert flip_labels(labels, 0.0, 4, seed=0)[1].sum() == 0


def test_subsample_per_class(digits: LabelledExamples) -> None:
    sub = subsample_per_class(digits, 30, seed=1)
    assert np.bincount(sub.labels).tolist() == [30] * 10
    assert sub.sources == subsample_per_class(digits, 30, seed=1).sources
    idx = [int(s.split("#")[1]) for s in sub.sources]
    assert idx == sorted(idx)


# --------------------------------------------------------------------------- features


def test_image_features(digits: LabelledExamples) -> None:
    assert digits.images is not None
    x = image_features(digits.images[:5])
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() == 1.0
    assert np.allclose(x[:, 0] * 255, digits.images[:5])
    rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    y = image_features(rgb)
    assert y.shape == (2, 3, 4, 5)
    assert np.allclose(y[1, 2] * 255, rgb[1, :, :, 2])


def test_vectorizer_on_bbc(bbc: LabelledExamples) -> None:
    assert bbc.texts is not None
    texts = bbc.texts[::4]
    vec = TextVectorizer().fit(texts, max_features=300, min_df=2)
    assert len(vec.vocabulary) == 300 and len(set(vec.vocabulary)) == 300
    x = vec.transform(texts)
    assert x.shape == (len(texts), 300) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)

    again = TextVectorizer().fit(texts, max_features=300, min_df=2)
    assert again.vocabulary == vec.vocabulary
    assert np.array_equal(again.transform(texts), x)
    restored = TextVectorizer.from_dict(json.loads(json.dumps(vec.to_dict())))
    assert restored.vocabulary == vec.vocabulary
    assert np.array_equal(restored.transform(texts[:20]), x[:20])


def test_vectorizer_vocabulary_rules() -> None:
    texts = ["The cats sat; cats purr.", "Cats and dogs", "A dog's bark", "zebra"]
    vec = TextVectorizer().fit(texts, max_features=10, min_df=2)
    assert vec.vocabulary == ("cats",)  # only word in >= 2 texts ("dog" vs "dogs" differ)
    assert TextVectorizer.tokens("The dog's owner didn't LIKE it, café!") == ["dog", "owner", "like", "cafe"]
    capped = TextVectorizer().fit(texts, max_features=2, min_df=1)
    assert capped.vocabulary == ("cats", "bark")  # by document frequency, ties alphabetical
    x = capped.transform(["cats cats cats", "nothing known"])
    assert x[0].tolist() == [1.0, 0.0] and not x[1].any()
    with pytest.raises(DataError):
        TextVectorizer().fit(["one", "two"], min_df=2)
