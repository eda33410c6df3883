"""chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation"), with the
defaults of sacreBLEU 2: character n-grams of orders 1..6, whitespace removed, beta = 2, no word
n-grams, case kept.

Per order n: precision = matched / hypothesis n-grams, recall = matched / reference n-grams
(matches clipped by counts; hypothesis n-grams of an order the reference is too short to have
are not counted). Precision and recall are averaged over the *effective* orders (those
where both sides have n-grams: short strings have no 6-grams), then
``chrF = (1 + beta^2) P R / (beta^2 P + R)``, on a 0..100 scale. A corpus score sums the counts
over segments first. sacrebleu is the test oracle (tests/test_tasks.py), not a dependency.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

CHAR_ORDER = 6
BETA = 2.0


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf_stats(hypothesis: str, reference: str, order: int = CHAR_ORDER) -> list[int]:
    """``[hyp, ref, match]`` n-gram counts for n = 1..order (flattened)."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    stats = []
    for n in range(1, order + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        n_ref = sum(r.values())
        # a hypothesis n-gram where the reference is too short to have any is not counted
        # (sacreBLEU's rule; it matters for corpus scores, where counts are summed)
        stats += [sum(h.values()) if n_ref else 0, n_ref, sum((h & r).values())]
    return stats


def chrf_from_stats(stats: Sequence[int], beta: float = BETA) -> float:
    """chrF (0..100) from :func:`chrf_stats` (or their sum over a corpus)."""
    precisions, recalls = [], []
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i:i + 3]
        if n_hyp > 0 and n_ref > 0:
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """chrF of one segment, 0..100."""
    return chrf_from_stats(chrf_stats(hypothesis, reference))


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """chrF of a corpus (counts summed over segments), 0..100."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    total = [0] * (3 * CHAR_ORDER)
    for h, r in zip(hypotheses, references):
        total = [a + b for a, b in zip(total, chrf_stats(h, r))]
    return chrf_from_stats(total)
