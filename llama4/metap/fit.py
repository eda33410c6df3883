"""The numbers behind the MetaP claims: the best LR of one configuration, and the least-squares
law of the best LR over proxy configurations that the predictor extrapolates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from llama4.metap.proxy import ProxyRun

# What makes two rows the same configuration: every field of the run but its LR, seed and family.
CONFIG_KEYS = tuple(f for f in ProxyRun.__dataclass_fields__ if f not in ("lr", "seed", "family"))


@dataclass(frozen=True)
class Optimum:
    log2_lr: float  # parabola vertex in log2(LR), or the grid point at an edge
    loss: float  # the fitted loss there (never above the best grid point's)
    grid_log2_lr: float  # the best grid point
    grid_loss: float
    curvature: float  # nats per (log2 LR)^2; nan at an edge
    at_edge: bool  # the best grid point is the smallest or largest LR: the optimum may lie outside
    n_seeds: int


def config_of(row: dict) -> tuple:
    return tuple(row.get(k) for k in CONFIG_KEYS)


def group_configs(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[config_of(r)].append(r)
    return dict(out)


def lr_curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(log2 LRs, seed-mean val loss, seeds) of one configuration; a diverged run counts as +inf."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        by_lr[math.log2(r["lr"])].append(math.inf if r["diverged"] else r["val_loss"])
    xs = np.array(sorted(by_lr))
    ys = np.array([np.mean(by_lr[x]) for x in xs])
    return xs, ys, max(len(v) for v in by_lr.values())


def optimum(rows: list[dict]) -> Optimum:
    """Best LR of one configuration: a parabola in log2(LR) through the best grid point and its
    two neighbours (seed means), never the bare arg-min of a factor-2 grid."""
    xs, ys, n = lr_curve(rows)
    i = int(np.argmin(ys))
    if not np.isfinite(ys[i]):
        raise ValueError("every LR diverged")
    if i == 0 or i == len(xs) - 1 or not np.isfinite(ys[i - 1:i + 2]).all():
        return Optimum(float(xs[i]), float(ys[i]), float(xs[i]), float(ys[i]), math.nan, True, n)
    a, b, c = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
    x = -b / (2 * a)  # a > 0: the middle point is the lowest of three
    x = float(np.clip(x, xs[i - 1], xs[i + 1]))
    y = float(min(a * x * x + b * x + c, ys[i]))
    return Optimum(x, y, float(xs[i]), float(ys[i]), float(a), False, n)


# --------------------------------------------------------------------------------------------
# the law:  log2 LR* = c0 + sum_j c_j * log2(feature_j / base_j)

FEATURES = ("width", "depth", "tokens", "n_experts", "expert_mult")


@dataclass
class LRLaw:
    features: tuple[str, ...]  # the axes the proxies varied (others are held at the base)
    base: dict[str, float]  # the base value of every axis
    coef: dict[str, float]  # "const" and one slope per feature (log2 LR per doubling)
    ranges: dict[str, tuple[float, float]]  # proxy range of every feature
    residual_rms: float  # log2 units
    loo_rms: float  # leave-one-config-out prediction error, log2 units
    n: int

    def predict_log2(self, point: dict[str, float]) -> float:
        y = self.coef["const"]
        for f in self.features:
            y += self.coef[f] * math.log2(point[f] / self.base[f])
        return y

    def extrapolation(self, point: dict[str, float]) -> dict[str, float]:
        """Factor by which ``point`` lies outside the proxies' range on each axis (>1 only)."""
        out = {}
        for f, (lo, hi) in self.ranges.items():
            v = point[f]
            factor = max(lo / v, v / hi, 1.0)
            if factor > 1.0:
                out[f] = factor
        return out

    def to_dict(self) -> dict:
        return {"features": list(self.features), "base": self.base, "coef": self.coef,
                "ranges": {k: list(v) for k, v in self.ranges.items()}, "residual_rms_log2": self.residual_rms,
                "loo_rms_log2": self.loo_rms, "n_configs": self.n}


def point_of(row: dict) -> dict[str, float]:
    return {"width": row["width"], "depth": row["depth"], "tokens": row["steps"] * row["batch"] * row["seq_len"],
            "n_experts": row["n_experts"], "expert_mult": row["expert_mult"]}


def fit_law(optima: list[tuple[dict, Optimum]], base: dict[str, float], ridge: float = 1e-3) -> LRLaw:
    """Least squares of log2 LR* on log2 of every axis the proxies varied (edge optima are left
    out: their true optimum is unknown). A tiny ridge keeps a barely-varied axis from exploding."""
    pts = [(p, o.log2_lr) for p, o in optima if not o.at_edge]
    if len(pts) < 2:
        raise ValueError(f"need >= 2 interior optima to fit an LR law, got {len(pts)}")
    feats = tuple(f for f in FEATURES if len({p[f] for p, _ in pts}) > 1)
    X = np.array([[1.0] + [math.log2(p[f] / base[f]) for f in feats] for p, _ in pts])
    y = np.array([v for _, v in pts])

    def solve(X, y):
        reg = ridge * np.eye(X.shape[1])
        reg[0, 0] = 0.0
        return np.linalg.solve(X.T @ X + reg, X.T @ y)

    w = solve(X, y)
    res = y - X @ w
    loo = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        if keep.sum() >= X.shape[1]:
            loo.append(y[i] - X[i] @ solve(X[keep], y[keep]))
    ranges = {f: (min(p[f] for p, _ in pts), max(p[f] for p, _ in pts)) for f in FEATURES}
    return LRLaw(feats, dict(base), {"const": float(w[0]), **{f: float(c) for f, c in zip(feats, w[1:])}},
                 ranges, float(np.sqrt(np.mean(res ** 2))),
                 float(np.sqrt(np.mean(np.square(loo)))) if loo else math.nan, len(y))
