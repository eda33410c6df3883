"""Bradley–Terry ratings (llama4/arena/ratings.py) against FastChat's ``compute_mle_elo``, computed
here the way FastChat computes it: scikit-learn's logistic regression without intercept or penalty
on ±log(10) design rows, wins weighted twice and ties once each way, rating = 400 coef + 1000.
Ours is a Newton solve on the win matrix (no scikit-learn at run time); both must agree within 1
rating point, on the full data and on every bootstrap resample (the same resamples), so the
confidence intervals agree too. On battles drawn from known strengths the fit recovers them."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from oracles import require
from llama4.arena import ratings as R

sklearn_lm = require("sklearn.linear_model")

TRUE = {"alpha": 1250.0, "bravo": 1100.0, "charlie": 1000.0, "delta": 900.0, "echo": 750.0}


def draw(n: int, seed: int, tie_rate: float = 0.0, strengths=TRUE) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    names = list(strengths)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        ma, mb = names[a], names[b]
        if rng.random() < tie_rate:
            out.append((ma, mb, "tie" if rng.random() < 0.5 else "tie (bothbad)"))
            continue
        p_a = 1.0 / (1.0 + 10 ** ((strengths[mb] - strengths[ma]) / 400))
        out.append((ma, mb, "model_a" if rng.random() < p_a else "model_b"))
    return out


def compute_mle_elo(battles, SCALE=400, BASE=10, INIT_RATING=1000) -> dict[str, float]:
    """FastChat's compute_mle_elo (fastchat/serve/monitor/elo_analysis.py), pandas pivots replaced
    by dict counts: the same design matrix, weights and scikit-learn fit."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    idx = {m: i for i, m in enumerate(models)}
    p = len(models)
    win = np.zeros((p, p))  # ptbl_win = 2 * a_win + 2 * b_win.T + tie + tie.T
    for a, b, w in battles:
        if w == "model_a":
            win[idx[a], idx[b]] += 2
        elif w == "model_b":
            win[idx[b], idx[a]] += 2
        else:
            win[idx[a], idx[b]] += 1
            win[idx[b], idx[a]] += 1
    X, Y, weights = [], [], []
    for i in range(p):
        for j in range(p):
            if i == j:
                continue
            x = np.zeros(p)
            x[i], x[j] = math.log(BASE), -math.log(BASE)
            X += [x, x]
            Y += [1.0, 0.0]
            weights += [win[i, j], win[j, i]]
    # FastChat: LogisticRegression(fit_intercept=False, penalty=None, tol=1e-6); scikit-learn >= 1.8
    # spells "no penalty" C=inf (penalty=None is deprecated there).
    lr = sklearn_lm.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr.fit(np.array(X), np.array(Y), sample_weight=np.array(weights))
    return dict(zip(models, SCALE * lr.coef_[0] + INIT_RATING))


def test_equals_fastchat_compute_mle_elo_within_one_point_with_ties():
    battles = draw(3000, seed=1, tie_rate=0.15)
    ours = {r["model"]: r["rating"] for r in R.leaderboard(battles, rounds=100)["rows"]}
    oracle = compute_mle_elo(battles)
    diff = max(abs(ours[m] - oracle[m]) for m in oracle)
    print(f"\nmax |ours - FastChat/sklearn| = {diff:.2e} rating points")
    assert diff < 1.0
    assert abs(np.mean(list(ours.values())) - 1000.0) < 1e-6  # anchored: mean 1000


def test_bootstrap_intervals_equal_the_oracle_on_the_same_resamples():
    battles = draw(600, seed=2, tie_rate=0.1)
    board = R.leaderboard(battles, rounds=100, seed=7)
    models, coded = R.encode(battles)
    boot = []
    for idx in R.bootstrap_samples(len(battles), 100, seed=7):
        o = compute_mle_elo([battles[i] for i in idx])
        boot.append([o[m] for m in models])
    lo, hi = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    got = {r["model"]: r for r in board["rows"]}
    for i, m in enumerate(models):
        assert abs(got[m]["ci_low"] - lo[i]) < 1.0 and abs(got[m]["ci_high"] - hi[i]) < 1.0, (m, got[m], lo[i], hi[i])


def test_recovers_known_strengths_within_the_intervals():
    battles = draw(4000, seed=3)
    board = R.leaderboard(battles, rounds=200, seed=0)
    order = [r["model"] for r in board["rows"]]
    assert order == sorted(TRUE, key=lambda m: -TRUE[m])  # the order of the strengths
    assert [r["rank"] for r in board["rows"]] == [1, 2, 3, 4, 5]  # well separated: no overlapping intervals
    for r in board["rows"]:
        assert r["ci_low"] <= TRUE[r["model"]] <= r["ci_high"], r  # TRUE has mean 1000, as the fit
        assert r["ci_high"] - r["ci_low"] < 120
    assert not board["provisional"] and board["rounds"] == 200


def test_rank_counts_models_clearly_above():
    # charlie and delta are equal: overlapping intervals share a rank
    battles = draw(2000, seed=4, strengths={"alpha": 1300.0, "charlie": 1000.0, "delta": 1000.0})
    ranks = {r["model"]: r["rank"] for r in R.leaderboard(battles, rounds=100)["rows"]}
    assert ranks == {"alpha": 1, "charlie": 2, "delta": 2}


def test_undefeated_model_gets_a_finite_provisional_rating():
    board = R.leaderboard([("a", "b", "model_a")], rounds=100)
    assert board["provisional"]
    (top, bottom) = board["rows"]
    assert top["model"] == "a" and 1000 < top["rating"] < 1500 and bottom["rating"] == pytest.approx(2000 - top["rating"])
    assert R.leaderboard([("a", "b", "model_a"), ("b", "a", "model_a")], rounds=100)["provisional"] is False


def test_win_fractions_and_counts():
    battles = [("a", "b", "model_a"), ("b", "a", "model_a"), ("a", "b", "tie"), ("a", "c", "model_b"),
               ("b", "c", "tie (bothbad)")]
    board = R.leaderboard(battles, rounds=100)
    assert board["models"] == ["a", "b", "c"]
    wf, games = board["win_fraction"], board["games"]
    assert games[0][1] == 3 and wf[0][1] == 0.5 and wf[1][0] == 0.5  # of the decided ones: the tie is left out
    assert wf[0][2] == 0.0 and wf[2][0] == 1.0 and wf[1][2] is None and games[1][2] == 1 and wf[0][0] is None
    a = next(r for r in board["rows"] if r["model"] == "a")
    assert (a["wins"], a["ties"], a["losses"], a["battles"]) == (1, 1, 2, 4)
    json.dumps(board)  # the page gets it as JSON: no NaN


def test_bad_input():
    with pytest.raises(ValueError, match="winner 'A'"):
        R.leaderboard([("a", "b", "A")])
    with pytest.raises(ValueError, match="rounds"):
        R.leaderboard([("a", "b", "tie")], rounds=0)
    assert R.leaderboard([])["rows"] == []
