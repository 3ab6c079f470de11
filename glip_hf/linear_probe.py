"""Linear probe: multinomial logistic regression on frozen features, its regularisation chosen on validation rows.

The features of a contrastive model are badly conditioned: on the built-in run's model the variances along their
principal axes fall smoothly over 15 decades. An iterative solver on the raw features (scikit-learn's L-BFGS, as this
module used before) was still far from the optimum after its 300 iterations, so the C the search chose and the test
accuracy turned on float rounding (features perturbed by 1e-6 of their size moved top-1 from 0.442 to 0.455 or
0.447), and the fits were poor (validation top-1 0.398 at the chosen C, against 0.559 here). Here every fit:

- runs in float64 on *whitened* features: centred on the fitting rows' mean, rotated onto their principal axes and
  scaled to unit variance there, axes with less than `VARIANCE_FLOOR` of the largest variance dropped (a spread under
  1e-4 of the largest, where the ~1e-7 relative rounding of float32 features is 1e-3 of the spread or more). C then
  means the same for every model: the L2 penalty weighs each direction by its spread in the data;
- minimises the mean cross-entropy plus ``|W|^2 / (2 C N)`` (scikit-learn's ``C * sum(CE) + |W|^2 / 2``, divided by
  ``C N``) with full-batch L-BFGS and a strong Wolfe line search from zero weights, until the largest gradient entry
  is below `GRADIENT_TOLERANCE` or `MAX_ITER` iterations (twice as many evaluations) have run (a warning says so
  for the final fit).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import classification_metrics

# Inverse regularisation strengths searched, in log10 of C on whitened features: a sweep of decades, extended a decade
# at a time while the best sits on an edge, then refined at half and quarter decades around the best.
LOG10_C = tuple(range(-4, 5))
LOG10_C_LIMITS = (-8, 8)
REFINE_STEPS = (0.5, 0.25)
VARIANCE_FLOOR = 1e-8  # relative to the largest principal variance
MAX_ITER = 1000
GRADIENT_TOLERANCE = 1e-6  # of the largest gradient entry of the mean loss; float64 stalls near 1e-8 here


@dataclass(frozen=True)
class Whitening:
    """``(x - mean) @ projection``: ``mean`` ``(D,)``, ``projection`` ``(D, R)`` with R <= D kept axes, float64."""

    mean: torch.Tensor
    projection: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Whitening:
        """From the rows ``x`` ``(N, D)`` the probe is fit on."""
        x = x.double()
        mean = x.mean(0)
        centred = x - mean
        variances, axes = torch.linalg.eigh(centred.T @ centred / len(x))
        keep = variances > VARIANCE_FLOOR * variances.max().clamp_min(torch.finfo(torch.float64).tiny)
        return cls(mean, axes[:, keep] / variances[keep].sqrt())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) @ self.projection


@dataclass(frozen=True)
class Probe:
    """A fitted probe: ``logits(x)`` ``(N, K)`` for features ``x`` ``(N, D)``."""

    whitening: Whitening
    weight: torch.Tensor  # (R, K)
    bias: torch.Tensor  # (K,)
    converged: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.whitening(x) @ self.weight + self.bias


def fit_probe(x: torch.Tensor, y: torch.Tensor, c: float, num_classes: int, max_iter: int = MAX_ITER) -> Probe:
    """Logistic regression of labels ``y`` ``(N,)`` on features ``x`` ``(N, D)`` at inverse regularisation ``c``.

    The weights are optimised as ``W = scale * V`` with ``scale = min(1, sqrt(c N))``: at a small C the penalty's
    curvature ``1 / (c N)`` would dwarf the data's (about 1 on whitened features) and stall L-BFGS; in ``V`` it is 1.
    """
    whitening = Whitening.fit(x)
    inputs, n = whitening(x), len(y)
    scale = min(1.0, math.sqrt(c * n))
    direction = torch.zeros(inputs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [direction, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=GRADIENT_TOLERANCE,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        weight = scale * direction
        loss = F.cross_entropy(inputs @ weight + bias, y) + weight.square().sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
        objective()
    largest = max((float(p.grad.abs().max()) for p in (direction, bias) if p.numel()), default=0.0)
    weight = (scale * direction).detach()  # (R, K); R = 0 when every feature is constant: a bias-only probe
    return Probe(whitening, weight, bias.detach(), converged=largest <= GRADIENT_TOLERANCE)


def _accuracy(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probe.logits(x).argmax(-1) == y).double().mean())


def search_c(train, val, num_classes: int, c_grid: Sequence[float] | None = None) -> tuple[float, float]:
    """The C with the best validation accuracy (the smaller C on ties) and that accuracy.

    ``train`` and ``val`` are ``(features (N, D), labels (N,))``. Without ``c_grid``: decades 1e-4 ... 1e4, extended
    a decade at a time (up to 1e-8 / 1e8) while the best is on an edge, then refined at half and quarter decades.
    """
    scores: dict[float, float] = {}

    def best() -> float:
        return max(scores, key=lambda c: (scores[c], -c))

    def score(cs) -> None:
        for c in map(float, cs):
            if c not in scores:
                scores[c] = _accuracy(fit_probe(*train, c, num_classes), *val)

    if c_grid is not None:
        score(c_grid)
        return best(), scores[best()]
    low, high = LOG10_C[0], LOG10_C[-1]
    score(10.0**k for k in range(low, high + 1))
    while True:
        centre = math.log10(best())
        if round(centre) == low and low > LOG10_C_LIMITS[0]:
            low -= 1
            score([10.0**low])
        elif round(centre) == high and high < LOG10_C_LIMITS[1]:
            high += 1
            score([10.0**high])
        else:
            break
    for step in REFINE_STEPS:
        centre = math.log10(best())
        score([10.0 ** (centre - step), 10.0 ** (centre + step)])
    return best(), scores[best()]


def fit_linear_probe(
    train_x, train_y, test_x, test_y, num_classes, val_fraction=0.2, seed=0, val=None, c_grid=None
) -> tuple[dict[str, float], dict[str, float]]:
    """Fit on frozen features ``(N, D)`` with C chosen on a validation split, and score the test rows.

    Args:
        val: optional ``(features, labels)``; otherwise ``val_fraction`` of the training rows is held out.
        c_grid: the C values to try; default: the search of [`search_c`].
    Returns:
        ``(metrics on the test rows, {"C": chosen C, "val_top1": its validation accuracy})``; the final classifier
        is refit on train + validation with the chosen C.
    """
    named = {"train": train_x, "test": test_x, **({"validation": val[0]} if val is not None else {})}
    for role, features in named.items():
        bad = int((~torch.isfinite(features)).any(dim=-1).sum())
        if bad:  # eigh failed on them with a message about conditioning; NaN test rows were scored as class 0
            raise ValueError(
                f"the linear probe's {role} features hold NaN or inf in {bad} of {len(features)} rows: the model's "
                "image features are not finite (a diverged checkpoint?); evaluate a checkpoint whose outputs are."
            )
    if len(train_y.unique()) < 2:
        raise ValueError(
            f"--train_split: the linear probe needs training rows of 2 or more classes; every usable one is class "
            f"{int(train_y[0])}. Train it on a split that holds several classes."
        )
    if val is None:
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
        cut = max(1, int(len(order) * val_fraction))
        val = (train_x[order[:cut]], train_y[order[:cut]])
        train_x, train_y = train_x[order[cut:]], train_y[order[cut:]]
        if len(train_y.unique()) < 2:  # the other classes all went to the validation rows
            raise ValueError(
                f"--linear_probe_val_fraction {val_fraction} leaves training rows of one class only (of "
                f"{len(order)} rows); pass a smaller fraction, a --val_split, or more training rows."
            )
    best_c, val_accuracy = search_c((train_x, train_y), val, num_classes, c_grid)
    probe = fit_probe(torch.cat([train_x, val[0]]), torch.cat([train_y, val[1]]), best_c, num_classes)
    if not probe.converged:
        warnings.warn(
            f"the linear probe's final fit (C={best_c:.3g}) stopped short of its gradient tolerance (L-BFGS ran "
            f"out of its {MAX_ITER} iterations or {2 * MAX_ITER} evaluations); its accuracy may depend on float "
            "rounding.",
            stacklevel=2,
        )
    metrics = classification_metrics(probe.logits(test_x).float(), test_y, num_classes)
    chosen = {"C": best_c, "val_top1": val_accuracy}
    return {"top1": metrics["top1"], "mean_per_class_recall": metrics["mean_per_class_recall"]}, chosen
