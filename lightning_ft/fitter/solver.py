"""The Levenberg-Marquardt core that per-frame fitting (`frames.fit_frames`)
and calibration (`calibration.calibrate`) share: damping and its update
rules, the gain ratio, the stopping rule, and the handling of bounds on the
expression coefficients (projected LM).

LM solves (H + mu diag(D)) d = -g for the step d, with H the Gauss-Newton
matrix J^T J (plus priors), g = J^T r, D = diag(H) + 1e-6 (`damping_scale`)
and the cost sum r^2. A caller owns its normal equations and its trial
evaluation; the core says how mu moves and when to stop.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

DAMPING_RULES = ("fixed", "nielsen")


def damping_scale(H: torch.Tensor) -> torch.Tensor:
    """D [..., n]: the diagonal of H [..., n, n] plus 1e-6, which LM's
    damping multiplies (Marquardt's scaling: each unknown damped in its own
    units; the 1e-6 keeps an unobserved one finite)."""
    return torch.diagonal(H, dim1=-2, dim2=-1) + 1e-6


class Damping:
    """The LM damping mu of independent systems and the rule that moves it.

    mu: initial damping, [n] for n independent systems (per-frame fitting:
    one per frame) or 0-d for one system (calibration's joint fit); its
    dtype is the arithmetic's.
    rule "fixed": mu / 3 after a taken step, x 4 after a rejected one;
    "nielsen" (Nielsen 1999): after a taken step mu x max(1/3,
    1 - (2 rho - 1)^3) from the gain ratio rho, after a rejected one mu x nu,
    nu doubling while steps keep failing. Calibration uses Nielsen's: /3 per
    taken step overshot and paid for it in rejected trials (each a solve and
    a residual evaluation). Per-frame fitting keeps the fixed factors, under
    which its tolerances and figures were set. mu stays within [1e-7, 1e7].
    """

    def __init__(self, rule: str, mu: torch.Tensor):
        if rule not in DAMPING_RULES:
            raise ValueError(f"unknown damping rule {rule!r}; one of {DAMPING_RULES}")
        self.rule = rule
        self.mu = mu
        self.nu = torch.full_like(mu, 2.0)

    def damped(self, H: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """H + diag(mu D) for H [n, ..., D, D] (one mu per leading index; a 0-d
        mu damps all of them) with D `scale` [n, ..., D] (default
        `damping_scale(H)`)."""
        scale = damping_scale(H) if scale is None else scale
        mu = self.mu.reshape(self.mu.shape + (1,) * (scale.dim() - self.mu.dim())) if self.mu.dim() else self.mu
        return H + torch.diag_embed(mu * scale)

    def update(self, taken: torch.Tensor, gain_ratio: Optional[torch.Tensor] = None,
               settled: Optional[torch.Tensor] = None) -> None:
        """Move mu after a trial: taken [n] (or 0-d) bool, the systems whose
        step was taken; gain_ratio, their actual over predicted decrease
        (`gain_ratio`; "nielsen" only); settled, the systems that took a
        step earlier in this iteration and are not retried (mu kept)."""
        taken = torch.as_tensor(taken)
        if self.rule == "fixed":
            rejected = self.mu * 4 if settled is None else torch.where(settled, self.mu, self.mu * 4)
            self.mu = torch.where(taken, self.mu / 3, rejected).clamp(1e-7, 1e7)
            return
        factor = torch.ones_like(self.mu)
        if bool(taken.any()):
            # per system in double precision
            rho = torch.as_tensor(gain_ratio, dtype=torch.float64).expand(self.mu.shape).reshape(-1).tolist()
            factor = torch.tensor([max(1 / 3, 1 - (2 * r - 1) ** 3) for r in rho],
                                  dtype=self.mu.dtype).reshape(self.mu.shape)
        mu_rejected, nu_rejected = (self.mu * self.nu).clamp(max=1e7), self.nu * 2
        if settled is not None:
            mu_rejected = torch.where(settled, self.mu, mu_rejected)
            nu_rejected = torch.where(settled, self.nu, nu_rejected)
        self.mu = torch.where(taken, (self.mu * factor).clamp(min=1e-7), mu_rejected)
        self.nu = torch.where(taken, torch.full_like(self.nu, 2.0), nu_rejected)


def predicted_decrease(blocks: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       mu: torch.Tensor) -> torch.Tensor:
    """The decrease of the cost sum r^2 that the linear model predicts for
    the damped step: -g.d + mu d.(D d), summed over the unknowns' `blocks`
    (g, d, D) of matching shapes (with (H + mu D) d = -g, the model's
    decrease -2 g.d - d.H d is that). One system: mu 0-d."""
    total = -(blocks[0][0] * blocks[0][1]).sum()
    for g, d, _ in blocks[1:]:
        total = total - (g * d).sum()
    for _, d, scale in blocks:
        total = total + mu * (scale * d ** 2).sum()
    return total


def gain_ratio(actual: float, predicted: float) -> float:
    """rho: the actual decrease over the one the linear model predicted."""
    return actual / max(predicted, 1e-30)


def relative_decrease_below(old_cost: float, new_cost: float, tol: float) -> bool:
    """The stopping rule: an iteration lowered the cost by at most `tol`
    of its value."""
    return (old_cost - new_cost) <= tol * max(old_cost, 1e-12)


# ----------------------------------------------------------------------------
# Bounds on the expression coefficients


def active_bounds(expression: torch.Tensor, grad: torch.Tensor, bounds: Optional[Tuple[float, float]]) -> torch.Tensor:
    """[T,E] bool: expression coefficients at a bound whose gradient
    `grad` [T,E] points out of the box. A projected step moves them nowhere,
    and their unconstrained step only bends everyone else's: LM then
    rejected trial after trial (calibration stalled tens of percent off the
    focal on heads with most weights at 0). Projected Newton holds them."""
    if bounds is None:
        return torch.zeros_like(expression, dtype=torch.bool)
    lo, hi = bounds
    return ((expression <= lo + 1e-6) & (grad > 0)) | ((expression >= hi - 1e-6) & (grad < 0))


def hold_coordinates(H: torch.Tensor, g: torch.Tensor, held: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H, g) with the coordinates `held` [T,D] removed from per-frame
    normal equations H [T,D,D], g [T,D]: their step comes out 0."""
    if not bool(held.any()):
        return H, g
    keep = (~held).to(H.dtype)
    H = H * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(held.to(H.dtype))
    g = g * keep
    return H, g


def feasible_fraction(expression: torch.Tensor, step: torch.Tensor, bounds: Tuple[float, float]) -> torch.Tensor:
    """Per frame [T], the largest fraction (<= 1) of the expression step
    [T,E] that keeps every weight inside `bounds` (weights already at a
    bound and moving out do not count: clipping keeps them there)."""
    lo, hi = bounds
    room = torch.where(step < 0, (lo - expression) / step.clamp(max=-1e-12),
                       torch.where(step > 0, (hi - expression) / step.clamp(min=1e-12), torch.ones_like(step)))
    room = torch.where(room > 1e-9, room, torch.ones_like(room))
    return room.clamp(max=1.0).amin(1)
