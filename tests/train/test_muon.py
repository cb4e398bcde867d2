"""Muon against its definition: the Newton-Schulz iteration against the SVD's polar factor, and
the optimizer's step against the update written out by hand."""

import pytest
import torch

from core.models.fast import FastNet
from core.train.muon import CUBIC, QUINTIC, Muon, newton_schulz
from core.train.optim import make_optimizer, muon_groups, param_groups


def polar_factor(matrix):
    """U V^T of the SVD, the orthogonal factor Newton-Schulz approximates."""
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(8, 8), (16, 72), (72, 16)])
def test_the_cubic_iteration_converges_to_the_svds_polar_factor(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = newton_schulz(matrix, steps=60, coefficients=CUBIC)
    torch.testing.assert_close(result, polar_factor(matrix), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(16, 16), (32, 288), (288, 32)])
def test_five_quintic_steps_keep_the_singular_vectors_and_bring_every_singular_value_near_one(shape):
    """Jordan's coefficients trade exactness for speed: the singular vectors are the SVD's, each
    singular value ends between about 0.7 and 1.2, whatever its size was, within 5 steps."""
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=gen, dtype=torch.float64))
    spread = torch.logspace(-3, 2, min(shape), dtype=torch.float64)  # singular values over five decades
    matrix = u @ torch.diag(spread) @ v.T
    result = newton_schulz(matrix, steps=5, coefficients=QUINTIC)
    in_svd_basis = u.T @ result @ v  # diagonal where the singular vectors are kept
    values = torch.diagonal(in_svd_basis)
    off_diagonal = in_svd_basis - torch.diag(values)
    assert off_diagonal.abs().max() < 1e-5  # the iteration runs in fp32
    large = spread > 1e-2 * spread.max()  # five steps lift every value above a hundredth of the largest
    assert ((values[large] > 0.6) & (values[large] < 1.25)).all(), values


def test_newton_schulz_keeps_the_dtype_and_refuses_what_is_not_a_matrix():
    matrix = torch.randn(4, 6, dtype=torch.bfloat16)
    assert newton_schulz(matrix).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="takes a matrix"):
        newton_schulz(torch.randn(2, 3, 4))


def test_a_muon_step_is_the_orthogonalized_nesterov_momentum_of_the_flattened_filters():
    gen = torch.Generator().manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=gen))
    optimizer = Muon([weight], lr=0.1, momentum=0.9, weight_decay=0.01)
    start, buffer = weight.detach().clone(), torch.zeros_like(weight)
    expected = start.clone()
    for _ in range(3):
        weight.grad = torch.randn(weight.shape, generator=gen)
        buffer = 0.9 * buffer + weight.grad
        direction = (weight.grad + 0.9 * buffer).reshape(8, 27)
        expected = expected * (1 - 0.1 * 0.01) - 0.1 * newton_schulz(direction).view(8, 3, 3, 3)
        optimizer.step()
        torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"], buffer)
    assert not torch.equal(weight.detach(), start)


def test_the_update_s_rms_per_entry_is_one_over_the_square_root_of_the_fan_in_wide_or_tall():
    """Orthonormal rows of a wide matrix have an RMS of 1/sqrt(columns) per entry; a tall one's
    orthonormal columns have 1/sqrt(rows), which the scale sqrt(rows / columns) brings to the same
    1/sqrt(columns). Five quintic steps leave the singular values within about 0.7 to 1.2."""
    for rows, columns in ((4, 16), (16, 4)):
        weight = torch.nn.Parameter(torch.zeros(rows, columns))
        weight.grad = torch.randn(rows, columns, generator=torch.Generator().manual_seed(3))
        Muon([weight], lr=1.0, momentum=0.0).step()
        rms = weight.detach().pow(2).mean().sqrt()
        assert rms == pytest.approx(columns ** -0.5, rel=0.3), (rows, columns)


def test_muon_refuses_a_vector_parameter():
    with pytest.raises(ValueError, match="belongs to a group with orthogonalize=False"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_a_group_that_is_not_orthogonalized_steps_as_torchs_nesterov_sgd():
    gen = torch.Generator().manual_seed(4)
    ours, theirs = (torch.nn.Parameter(torch.ones(6)) for _ in range(2))
    muon = Muon([{"params": [ours], "orthogonalize": False}], lr=0.1, momentum=0.85, weight_decay=0.01)
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        grad = torch.randn(6, generator=gen)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        muon.step()
        sgd.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_normalize_rescales_the_filters_to_norm_sqrt_rows_before_each_step():
    """airbench's Muon: w <- w * sqrt(rows) / |w|, then w <- w - lr * NS(momentum)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(3 * torch.randn(8, 4, 3, 3, generator=gen))
    optimizer = Muon([weight], lr=0.05, momentum=0.6, steps=3, normalize=True)
    expected, buffer = weight.detach().clone(), torch.zeros_like(weight)
    for _ in range(3):
        weight.grad = torch.randn(weight.shape, generator=gen)
        buffer = 0.6 * buffer + weight.grad
        direction = (weight.grad + 0.6 * buffer).reshape(8, 36)
        expected = expected * (8 ** 0.5 / expected.norm()) - 0.05 * newton_schulz(direction, 3).view(8, 4, 3, 3)
        optimizer.step()
        torch.testing.assert_close(weight.detach(), expected)


def test_muon_groups_give_the_filters_to_muon_and_leave_the_rest_to_sgd():
    model = FastNet()
    groups = muon_groups(param_groups(model, 1e-3, bias_lr_scale=64.0), lr_scale=0.16)
    filters = [g for g in groups if g.get("orthogonalize")]
    assert {id(p) for g in filters for p in g["params"]} == {id(p) for p in model.parameters()
                                                               if p.ndim == 4 and p.requires_grad}
    settings = {(g["lr_scale"], g["momentum"], g["weight_decay"], g["normalize"]) for g in filters}
    assert settings == {(0.16, 0.6, 0.0, True)}
    rest = [p for g in groups if not g.get("orthogonalize") for p in g["params"]]
    assert all(p.ndim < 4 for p in rest) and any(p is model.head.weight for p in rest)
    optimizer = make_optimizer("muon", model, 0.1, 1e-3, 64.0, momentum=0.85, muon_lr_scale=0.16)
    assert optimizer.defaults["momentum"] == 0.85 and len(optimizer.param_groups) == len(groups)
