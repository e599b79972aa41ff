"""The Levenberg-Marquardt core shared by per-frame fitting and calibration:
each damping rule solves small nonlinear least-squares problems with known
minima, the rules move the damping as documented, and projected steps keep
bounded coordinates inside their box."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_ft.fitter.solver import (DAMPING_RULES, Damping, active_bounds, damping_scale, feasible_fraction,
                                        gain_ratio, hold_coordinates, predicted_decrease, relative_decrease_below)


def _rosenbrock(x: torch.Tensor):
    """Residuals [n,2] and Jacobians [n,2,2] of n Rosenbrock problems
    (minimum 0 at x = (1, 1))."""
    r = torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], 1)
    J = torch.zeros(x.shape[0], 2, 2, dtype=x.dtype)
    J[:, 0, 0], J[:, 0, 1], J[:, 1, 0] = -20 * x[:, 0], 10.0, -1.0
    return r, J


def _lm(x: torch.Tensor, damping: Damping, iters: int = 200):
    """Independent problems stepped together as `fit_frames` does: each
    rejected system retried with more damping, taken ones settled."""
    for _ in range(iters):
        r, J = _rosenbrock(x)
        cost = (r ** 2).sum(1)
        H, g = J.transpose(1, 2) @ J, (J.transpose(1, 2) @ r[..., None])[..., 0]
        scale = damping_scale(H)
        settled = torch.zeros(x.shape[0], dtype=torch.bool)
        for _ in range(8):
            d = -torch.linalg.solve(damping.damped(H, scale), g[..., None])[..., 0]
            cost_new = (_rosenbrock(x + d)[0] ** 2).sum(1)
            taken = (cost_new < cost) & ~settled
            rho = torch.tensor([gain_ratio(float(cost[i] - cost_new[i]),
                                           float(predicted_decrease([(g[i], d[i], scale[i])], damping.mu[i])))
                                for i in range(x.shape[0])], dtype=torch.float64)
            x = torch.where(taken[:, None], x + d, x)
            damping.update(taken, rho, settled=settled)
            settled |= taken
            if settled.all():
                break
        new = (_rosenbrock(x)[0] ** 2).sum()
        if relative_decrease_below(float(cost.sum()), float(new), 1e-15) or float(new) < 1e-20:
            break
    return x


@pytest.mark.parametrize("rule", DAMPING_RULES)
def test_each_damping_rule_finds_the_rosenbrock_minimum(rule):
    start = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0], [-0.5, 2.5]], dtype=torch.float64)
    x = _lm(start, Damping(rule, torch.full((4,), 1e-3, dtype=torch.float64)))
    torch.testing.assert_close(x, torch.ones(4, 2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_one_damping_for_one_system_damps_every_block_alike():
    # calibration: one 0-d mu for all frames' blocks and the shared block
    damping = Damping("nielsen", torch.tensor(0.5, dtype=torch.float64))
    H = torch.eye(3, dtype=torch.float64).expand(4, 3, 3) * 2
    torch.testing.assert_close(damping.damped(H), H + 0.5 * torch.diag_embed(damping_scale(H)))
    per_system = Damping("fixed", torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    mu = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = H + torch.diag_embed(mu[:, None] * torch.full((4, 3), 2 + 1e-6, dtype=torch.float64))
    torch.testing.assert_close(per_system.damped(H), expected)


def test_fixed_rule_divides_by_3_multiplies_by_4_and_keeps_settled_systems():
    damping = Damping("fixed", torch.full((3,), 1e-3))
    damping.update(torch.tensor([True, False, False]), settled=torch.tensor([False, False, True]))
    torch.testing.assert_close(damping.mu, torch.tensor([1e-3 / 3, 4e-3, 1e-3]))
    for _ in range(30):
        damping.update(torch.tensor([False, True, False]))
    assert float(damping.mu[0]) == 1e7 and float(damping.mu[1]) == pytest.approx(1e-7)


def test_nielsen_rule_follows_the_gain_ratio_and_doubles_nu_on_failures():
    damping = Damping("nielsen", torch.tensor(1e-2, dtype=torch.float64))
    damping.update(True, 1.0)  # a perfect model: mu / 3
    assert float(damping.mu) == pytest.approx(1e-2 / 3)
    damping.update(True, 0.5)  # 1 - (2 rho - 1)^3 = 1: mu kept
    assert float(damping.mu) == pytest.approx(1e-2 / 3)
    damping.update(False)
    damping.update(False)  # x2, then x4
    assert float(damping.mu) == pytest.approx(1e-2 / 3 * 8)
    damping.update(True, 0.25)  # a poor model: 1 - (-0.5)^3 = 1.125
    assert float(damping.mu) == pytest.approx(1e-2 / 3 * 8 * 1.125)
    damping.update(False)  # nu was reset to 2 by the taken step
    assert float(damping.mu) == pytest.approx(1e-2 / 3 * 8 * 1.125 * 2)
    with pytest.raises(ValueError, match="damping rule"):
        Damping("trust-region", torch.tensor(1.0))


def test_predicted_decrease_is_the_linear_models():
    # For a linear least-squares problem the model is exact: the predicted
    # decrease of a damped step equals the actual one.
    torch.manual_seed(0)
    J, b = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    r = J @ x - b
    H, g = J.T @ J, J.T @ r
    damping = Damping("nielsen", torch.tensor(0.3, dtype=torch.float64))
    d = -torch.linalg.solve(damping.damped(H), g)
    actual = float((r ** 2).sum() - ((J @ (x + d) - b) ** 2).sum())
    # the two halves of the unknowns as two blocks, as calibration passes them
    scale = damping_scale(H)
    predicted = float(predicted_decrease([(g[:1], d[:1], scale[:1]), (g[1:], d[1:], scale[1:])], damping.mu))
    # the model's decrease is -2 g.d - d.H d; with (H + mu D) d = -g that is -g.d + mu d.D d
    assert predicted == pytest.approx(actual, rel=1e-9)
    assert gain_ratio(actual, predicted) == pytest.approx(1.0)


def test_stopping_rule_is_relative():
    assert relative_decrease_below(100.0, 99.95, 1e-3)
    assert not relative_decrease_below(100.0, 99.8, 1e-3)
    assert not relative_decrease_below(1e-3, 0.5e-3, 1e-3)


def test_projected_steps_keep_a_box_and_reach_the_bounded_minimum():
    # min (x - c)' Q (x - c) over 0 <= x <= 1 with a coupled Q and c outside
    # the box; compared with scipy's L-BFGS-B.
    Q = torch.tensor([[3.0, 1.0, 0.5], [1.0, 2.0, 0.3], [0.5, 0.3, 1.5]], dtype=torch.float64)
    c = torch.tensor([1.6, -0.4, 0.5], dtype=torch.float64)
    bounds = (0.0, 1.0)
    x = torch.full((1, 3), 0.5, dtype=torch.float64)
    damping = Damping("fixed", torch.full((1,), 1e-3, dtype=torch.float64))
    for _ in range(50):
        g = 2 * (x - c) @ Q
        H = (2 * Q).expand(1, 3, 3)
        held = active_bounds(x, g, bounds)
        H_free, g_free = hold_coordinates(H, g, held)
        d = -torch.linalg.solve(damping.damped(H_free), g_free[..., None])[..., 0]
        assert torch.all(d[held] == 0)
        x = x + d * feasible_fraction(x, d, bounds)[:, None]
        assert bool(((x >= bounds[0] - 1e-12) & (x <= bounds[1] + 1e-12)).all())
        damping.update(torch.tensor([True]))
    ref = minimize(lambda v: float((v - c.numpy()) @ Q.numpy() @ (v - c.numpy())), np.full(3, 0.5),
                   method="L-BFGS-B", bounds=[bounds] * 3, options={"ftol": 1e-15, "gtol": 1e-12})
    np.testing.assert_allclose(x[0].numpy(), ref.x, atol=1e-5)
    assert x[0, 0] == pytest.approx(1.0) and x[0, 1] == pytest.approx(0.0)


def test_feasible_fraction_stops_at_the_first_bound():
    expression = torch.tensor([[0.2, 0.9, 0.0]])
    step = torch.tensor([[-0.4, 0.2, -0.5]])  # the third sits at 0 moving out: not counted
    assert float(feasible_fraction(expression, step, (0.0, 1.0))[0]) == pytest.approx(0.5)
    assert float(feasible_fraction(expression, step * 0.1, (0.0, 1.0))[0]) == 1.0
