"""The Linear/Conv2d outer-product scoring path against brute-force per-example gradients (vmap(grad))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from precompute.scoring import per_example_gradients, score_pretraining
from precompute.layer_scores import layer_slots
from precompute.task import TwoStageTask


def conv_task(dtype, device="cpu", bias=True) -> TwoStageTask:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1, bias=bias), nn.Tanh(),
                              nn.Conv2d(3, 4, 2, dilation=2, bias=bias), nn.Tanh(), nn.Flatten())
    x = torch.randn(23, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (23,), generator=gen)
    fx, fy = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 2, (6,), generator=gen)
    task = TwoStageTask(embedding, nn.Linear(16, 3), nn.Linear(16, 2), x, y, fx, fy, fx, fy)
    return task.to(device, dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])   # scores are stored as float32
@pytest.mark.parametrize("bias", [True, False])
def test_conv_scores_equal_brute_force_per_example_gradients(dtype, rtol, bias):
    task = conv_task(dtype, bias=bias)
    assert layer_slots(task) is not None                  # the outer-product path applies
    p = task.initial_pretrain_params()
    vectors = torch.randn(task.n_pretrain_params, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = score_pretraining(task, p, vectors, chunk_size=7, progress=False, method="linear")
    brute = (per_example_gradients(task, p, task.pretrain_x, task.pretrain_y) @ vectors / task.m).T
    np.testing.assert_allclose(got, brute.numpy(), rtol=rtol, atol=rtol * float(brute.abs().max()))


def test_small_block_budget_splits_the_chunk(monkeypatch):
    import precompute.layer_scores as ls

    task = conv_task(torch.float64)
    p = task.initial_pretrain_params()
    vectors = torch.randn(task.n_pretrain_params, 2, dtype=torch.float64)
    whole = score_pretraining(task, p, vectors, progress=False, method="linear")
    monkeypatch.setattr(ls, "MAX_ELEMENTS", 10)
    np.testing.assert_allclose(score_pretraining(task, p, vectors, progress=False, method="linear"), whole,
                               rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_conv_scores_on_cuda_match_cpu():
    cpu = conv_task(torch.float32)
    cuda = conv_task(torch.float32, "cuda")
    vectors = torch.randn(cpu.n_pretrain_params, 3)
    a = score_pretraining(cpu, cpu.initial_pretrain_params(), vectors, progress=False, method="linear")
    b = score_pretraining(cuda, cuda.initial_pretrain_params(), vectors.cuda(), progress=False, method="linear")
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(a).max())
