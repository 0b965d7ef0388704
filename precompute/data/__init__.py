"""Data layer: labelled examples, the bundled datasets, users' own files, and model-input features.

Loaders return :class:`LabelledExamples`; every problem with input data raises :class:`DataError`
(a ValueError) with a one-line message naming the file and the fix.
"""

from .digits import load_digits_examples
from .examples import (
    DataError,
    LabelledExamples,
    flip_labels,
    select_classes,
    split_train_test,
    stratified_split_indices,
    subsample_per_class,
)
from .features import STOP_WORDS, TextVectorizer, image_features
from .news import bbc_news_dir, load_bbc_news
from .user_files import IMAGE_SUFFIXES, load_image_folder, load_mnist_idx, load_npy_images, load_text_table

__all__ = [
    "IMAGE_SUFFIXES",
    "STOP_WORDS",
    "DataError",
    "LabelledExamples",
    "TextVectorizer",
    "bbc_news_dir",
    "flip_labels",
    "image_features",
    "load_bbc_news",
    "load_digits_examples",
    "load_image_folder",
    "load_mnist_idx",
    "load_npy_images",
    "load_text_table",
    "select_classes",
    "split_train_test",
    "stratified_split_indices",
    "subsample_per_class",
]
