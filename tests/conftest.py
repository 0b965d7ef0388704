"""Shared test setup."""

import torch

# The models here are tiny: one thread avoids intra-op spin-waiting, which on a busy 2-core
# machine made a forward+backward 60x slower.
torch.set_num_threads(1)


import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    """Every test that uses the real CLI pipeline runs below is ``slow`` (see pytest.ini)."""
    for item in items:
        if "quick_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory):
    """Real quick pipeline runs made through the CLI: digits with 10% label noise, and news.

    Returns (runs root, {"image": run name, "text": run name}).
    """
    from precompute.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["--preset", "digits", "--quick", "--label-noise", "0.1", "--out", str(root / "digits")]) == 0
    assert main(["--preset", "news", "--quick", "--out", str(root / "news")]) == 0
    return root, {"image": "digits", "text": "news"}


@pytest.fixture(scope="session")
def tiny():
    """The tiny float64 two-stage task, trained once per session (``tests/tiny_task.py``)."""
    from tiny_task import tiny_task

    return tiny_task()


@pytest.fixture
def clear_streamlit_caches():
    """Empty st.cache_data / st.cache_resource before and after an AppTest test."""
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
