"""Bradley–Terry ratings of arena battles on the Elo scale, with bootstrap confidence intervals.

The model: P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)), ratings centred on 1000. The fit
is the maximum-likelihood estimate FastChat's ``compute_mle_elo`` computes with scikit-learn's
logistic regression (``fastchat/serve/monitor/elo_analysis.py``): a win counts as two wins of
the winner, a tie (or "tie (bothbad)") as one win each way, no intercept, no penalty, rating =
400 * coef + 1000. Here it is solved by Newton's method on the summed win matrix (no
scikit-learn at run time); the gradient of that likelihood is orthogonal to the all-ones vector,
so starting from zero both solutions keep the ratings' mean at 1000 and are the same point.

The MLE exists only when every group of models has won (or tied) at least once against the
rest (the win graph is strongly connected: Ford 1957). Early on it often does not (one vote:
the winner's MLE rating is infinite); then the fit is the MAP estimate under a N(1000, 400²)
prior on every rating and the result is marked ``provisional``.

Confidence intervals: ``rounds`` bootstrap resamples of the battles (with replacement, as
FastChat's ``get_bootstrap_result``), each fitted the same way; the interval is the 2.5th and
97.5th percentile. Rank = 1 + the number of models whose lower bound is above this one's upper
bound (FastChat's rank with confidence).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0
PRIOR_LAMBDA = 0.5  # coef-space penalty lambda * sum(c^2): a N(1000, 400^2) prior on ratings
_K = math.log(BASE)
_CODES = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 3}


def encode(outcomes: Sequence[tuple[str, str, str]]) -> tuple[list[str], np.ndarray]:
    """(sorted model names, (n, 3) int array of [index of A, index of B, outcome code])."""
    models = sorted({m for a, b, _ in outcomes for m in (a, b)})
    index = {m: i for i, m in enumerate(models)}
    rows = []
    for n, (a, b, w) in enumerate(outcomes):
        if w not in _CODES:
            raise ValueError(f"battle {n}: winner {w!r} is not one of {', '.join(_CODES)}")
        rows.append((index[a], index[b], _CODES[w]))
    return models, np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def win_matrix(coded: np.ndarray, p: int) -> np.ndarray:
    """(p, p) float W[i, j]: FastChat's weighted wins of i over j (2 per win, 1 per tie)."""
    a, b, w = coded[:, 0], coded[:, 1], coded[:, 2]
    W = np.zeros(p * p)
    np.add.at(W, a[w == 0] * p + b[w == 0], 2.0)
    np.add.at(W, b[w == 1] * p + a[w == 1], 2.0)
    tie = w >= 2
    np.add.at(W, a[tie] * p + b[tie], 1.0)
    np.add.at(W, b[tie] * p + a[tie], 1.0)
    return W.reshape(p, p)


def mle_exists(W: np.ndarray) -> bool:
    """Whether the win graph (edge i -> j when i won or tied against j) is strongly connected."""
    p = W.shape[0]
    if p < 2:
        return False
    adj = W > 0
    for graph in (adj, adj.T):
        seen, todo = {0}, [0]
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(graph[i]):
                if j not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
        if len(seen) < p:
            return False
    return True


def _loglik(W: np.ndarray, c: np.ndarray, lam: float) -> float:
    D = _K * (c[:, None] - c[None, :])
    return float(-(W * np.logaddexp(0.0, -D)).sum() - lam * (c @ c))


def fit_coef(W: np.ndarray, lam: float = 0.0, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """The Bradley–Terry coefficients (sum zero) maximising sum W log sigma(ln10 (c_i - c_j)) -
    lam |c|^2, by damped Newton steps."""
    p = W.shape[0]
    N = W + W.T
    c = np.zeros(p)
    f = _loglik(W, c, lam)
    for _ in range(max_iter):
        P = 1.0 / (1.0 + np.exp(-_K * (c[:, None] - c[None, :])))
        g = _K * (W - N * P).sum(axis=1) - 2.0 * lam * c
        V = _K * _K * N * P * (1.0 - P)
        H = np.diag(V.sum(axis=1)) - V + 2.0 * lam * np.eye(p)  # minus the Hessian
        H += np.ones((p, p)) / p  # fixes the free shift; g sums to zero, so the step keeps sum(c) = 0
        step = np.linalg.solve(H, g)
        t = 1.0
        while t > 1e-8:  # backtrack until the likelihood does not fall
            f_new = _loglik(W, c + t * step, lam)
            if f_new >= f - 1e-12 * abs(f):
                break
            t *= 0.5
        c, f = c + t * step, f_new
        if np.max(np.abs(t * step)) < tol:
            break
    return c - c.mean()


def fit_ratings(W: np.ndarray) -> tuple[np.ndarray, bool]:
    """(ratings on the Elo scale, whether they are the exact MLE; else the MAP estimate)."""
    exact = mle_exists(W)
    c = fit_coef(W, 0.0 if exact else PRIOR_LAMBDA)
    return SCALE * c + INIT_RATING, exact


def bootstrap_samples(n: int, rounds: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The battle indices of each bootstrap round: n draws with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        yield rng.integers(0, n, size=n)


def win_fractions(coded: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of the decided battles between them that row won against column, NaN where none
    was decided; all battles between them, ties included). FastChat's heatmap, "fraction of model
    A wins for all non-tied A vs. B battles" (``compute_pairwise_win_fraction`` on the battles
    without ties)."""
    a, b, w = coded[:, 0], coded[:, 1], coded[:, 2]
    wins = np.zeros(p * p)
    np.add.at(wins, a[w == 0] * p + b[w == 0], 1.0)
    np.add.at(wins, b[w == 1] * p + a[w == 1], 1.0)
    wins = wins.reshape(p, p)
    decided = wins + wins.T
    games = np.zeros(p * p)
    np.add.at(games, a * p + b, 1.0)
    games = games.reshape(p, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(decided > 0, wins / decided, np.nan)
    return frac, games + games.T


def leaderboard(outcomes: Sequence[tuple[str, str, str]], rounds: int = 1000, seed: int = 0) -> dict:
    """Ratings, 95% bootstrap intervals, ranks, battle counts and the win-fraction matrix::

        {"models": [...], "rows": [{"model", "rating", "ci_low", "ci_high", "rank", "battles",
                                    "wins", "ties", "losses"}...] (best first),
         "win_fraction": [[...]], "games": [[...]] (rows and columns in "models" order),
         "battles": N, "rounds": R, "provisional": bool}
    """
    if rounds < 1:
        raise ValueError(f"bootstrap rounds must be >= 1, got {rounds}")
    models, coded = encode(outcomes)
    p, n = len(models), len(coded)
    if n == 0:
        return {"models": [], "rows": [], "win_fraction": [], "games": [], "battles": 0, "rounds": rounds,
                "provisional": True}
    ratings, exact = fit_ratings(win_matrix(coded, p))
    boot = np.stack([fit_ratings(win_matrix(coded[idx], p))[0] for idx in bootstrap_samples(n, rounds, seed)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    frac, games = win_fractions(coded, p)
    a, b, w = coded[:, 0], coded[:, 1], coded[:, 2]
    rows = []
    for i, m in enumerate(models):
        in_a, in_b = a == i, b == i
        wins = int(((w == 0) & in_a).sum() + ((w == 1) & in_b).sum())
        losses = int(((w == 1) & in_a).sum() + ((w == 0) & in_b).sum())
        battles = int(in_a.sum() + in_b.sum())
        rows.append({"model": m, "rating": float(ratings[i]), "ci_low": float(lo[i]), "ci_high": float(hi[i]),
                     "rank": 1 + int((lo > hi[i]).sum()), "battles": battles, "wins": wins,
                     "ties": battles - wins - losses, "losses": losses})
    rows.sort(key=lambda r: -r["rating"])
    nan_to_none = [[None if math.isnan(x) else float(x) for x in row] for row in frac]
    return {"models": models, "rows": rows, "win_fraction": nan_to_none, "games": games.astype(int).tolist(),
            "battles": n, "rounds": rounds, "provisional": not exact}


def ratings_json(board: dict) -> list[dict]:
    """What ``llama4 arena ratings --json`` prints: [{"model", "rating", "ci_low", "ci_high", "battles"}]."""
    return [{k: r[k] for k in ("model", "rating", "ci_low", "ci_high", "battles")} for r in board["rows"]]
