"""Each loss of the paper against a value computed by hand (never against itself)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dfkd_bench.train import losses
from dfkd_bench.train.batchnorm import BatchNormStatistics


def test_kl_eq3_by_hand():
    # p_T = softmax([0, ln 3]) = [1/4, 3/4]; p_S = softmax([0, 0]) = [1/2, 1/2]
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert losses.kl_divergence(teacher, student).item() == pytest.approx(expected, abs=1e-7)
    assert expected == pytest.approx(0.1308120, abs=1e-6)


def test_kl_is_batch_mean_of_rows_and_zero_for_equal_logits():
    teacher = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    student = torch.tensor([[0.0, 0.0], [5.0, 5.0]])  # second row: same distribution
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert losses.kl_divergence(teacher, student).item() == pytest.approx(expected, abs=1e-7)


def test_kl_with_underflowing_teacher_probability_is_finite():
    teacher = torch.tensor([[0.0, -1000.0]])
    student = torch.tensor([[0.0, 0.0]])
    value = losses.kl_divergence(teacher, student)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(math.log(2.0), abs=1e-6)  # KL([1,0] || [1/2,1/2]) = ln 2


def test_js_matches_scipy_squared():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=5)
    q = rng.dirichlet(np.ones(7), size=5)
    p[0, :3] = 0  # zeros must be handled exactly (0 log 0 = 0)
    p[0] /= p[0].sum()
    ours = losses.js_divergence_per_sample(torch.tensor(p), torch.tensor(q)).numpy()
    reference = np.array([jensenshannon(p[i], q[i]) ** 2 for i in range(5)])
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)


def test_js_by_hand():
    # P = [1, 0], Q = [0, 1]: M = [1/2, 1/2], JS = ln 2
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    assert losses.js_divergence_per_sample(p, q).item() == pytest.approx(math.log(2.0), abs=1e-12)


def test_nll_eq7_by_hand():
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    labels = torch.tensor([1, 0])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert losses.nll_loss(teacher, labels).item() == pytest.approx(expected, abs=1e-6)


def test_normreg_eq8_by_hand():
    # ||[3, 4]|| = 5, radius = 1.1 * sqrt(2) = 1.5556...; ||[0.1, 0.1]|| < radius -> 0
    embeddings = torch.tensor([[3.0, 4.0], [0.1, 0.1]])
    expected = (5.0 - 1.1 * math.sqrt(2.0) + 0.0) / 2
    assert losses.norm_regulariser(embeddings, gamma=1.1).item() == pytest.approx(expected, abs=1e-6)


def test_bound_penalty_eqs_10_11_by_hand():
    values = torch.tensor([[-25.0, 10.0, 30.0]])
    assert losses.bound_penalty(values, 20.0).item() == pytest.approx((5.0 + 0.0 + 10.0) / 3)
    assert losses.bound_penalty(torch.tensor([[1.0, -2.0]]), 20.0).item() == 0.0


def test_bnmm_eq9_by_hand():
    # One BN layer with 2 channels. Channel 0 sees [1, 3]: mean 2, biased var 1.
    # Channel 1 sees [2, 2]: mean 2, var 0. Running mean [0, 1], running var [1, 4].
    # Loss = (2-0)^2 + (2-1)^2 + (1-1)^2 + (0-4)^2 = 4 + 1 + 0 + 16 = 21
    bn = nn.BatchNorm1d(2)
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    model = nn.Sequential(bn).eval()
    recorder = BatchNormStatistics(model)
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    with recorder.recording():
        model(x)
    value = losses.batchnorm_moment_loss(recorder.means, recorder.vars, recorder.running_means, recorder.running_vars)
    assert value.item() == pytest.approx(21.0)
    # outside `recording()` nothing is collected
    model(x)
    assert len(recorder.means) == 1


def test_bnmm_is_differentiable_wrt_images():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    recorder = BatchNormStatistics(model)
    x = torch.rand(4, 1, 3, 3, requires_grad=True)
    with recorder.recording():
        model(x)
    value = losses.batchnorm_moment_loss(recorder.means, recorder.vars, recorder.running_means, recorder.running_vars)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
