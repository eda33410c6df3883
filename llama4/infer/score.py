"""Log-probabilities of given tokens: what scoring (lm-eval's loglikelihood, the server's
``echo``/``logprobs``) needs from a model.

    scores = sequence_logprobs(model, [[bos, 5, 9, 2], [bos, 7]], top_k=1)
    scores[0].logprobs      # (3,): log p(5 | bos), log p(9 | bos 5), log p(2 | bos 5 9)
    scores[0].greedy        # (3,): whether each of those tokens was the model's argmax

Several sequences share each forward, right-padded: attention is causal and routing is per
token, so a row's scores do not depend on the padding or on its neighbours. They are prefilled
through a KV cache in pieces, each piece's logits scored and dropped, so a long sequence costs
one piece of logits, not (length, vocab). Log-softmax is taken in float32 whatever the model's
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """Scores of consecutive tokens, on the CPU; entry i is about token ``ids[i]``."""

    ids: torch.Tensor  # (N,) long: the scored tokens
    logprobs: torch.Tensor  # (N,) float32: log p(token | everything before it)
    greedy: torch.Tensor  # (N,) bool: the token is the argmax of its distribution
    top_ids: torch.Tensor  # (N, k) long: the k most likely tokens, most likely first
    top_logprobs: torch.Tensor  # (N, k) float32

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, s: slice) -> "TokenScores":
        return TokenScores(self.ids[s], self.logprobs[s], self.greedy[s], self.top_ids[s], self.top_logprobs[s])

    @classmethod
    def cat(cls, parts: list["TokenScores"]) -> "TokenScores":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("ids", "logprobs", "greedy", "top_ids", "top_logprobs")))


def next_token_scores(logits: torch.Tensor, ids: torch.Tensor, top_k: int = 0) -> TokenScores:
    """logits (N, V) of N positions and the token ids (N,) that followed -> their scores."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    ids = ids.to(logp.device).long()
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (N,)
    greedy = logp.argmax(-1) == ids
    if top_k > 0:
        top_lp, top_ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # (N, k), sorted
    else:
        top_lp, top_ids = logp.new_zeros(logp.shape[0], 0), ids.new_zeros(logp.shape[0], 0)
    return TokenScores(ids.cpu(), chosen.cpu(), greedy.cpu(), top_ids.cpu(), top_lp.cpu())


class _ScorePieces:
    """Called like the model by ``KVCache.prefill``, but asks it for every position's logits (the
    cache asks for the last only) and turns each piece's logits into scores right away, so only
    one piece's logits are ever held."""

    def __init__(self, model, targets: torch.Tensor, top_k: int):
        self.model, self.targets, self.top_k = model, targets, top_k  # targets (R, T-1)
        self.done = 0  # positions scored so far
        self.rows: list[list[TokenScores]] = [[] for _ in range(targets.shape[0])]

    def __call__(self, tokens, **kw):
        kw["last_only"] = False
        logits = self.model(tokens, **kw)  # (R, piece, V)
        s, e = self.done, self.done + logits.shape[1]
        for i, row in enumerate(self.rows):
            row.append(next_token_scores(logits[i], self.targets[i, s:e], self.top_k))
        self.done = e
        return logits[:, -1:]


def piece_for(rows: int, vocab: int, budget: int = 1 << 27) -> int:
    """Prefill piece length that keeps one piece's float32 logits near ``budget`` elements."""
    return max(16, min(2048, 1 << max(0, (budget // max(1, rows * vocab)).bit_length() - 1)))


@torch.inference_mode()
def sequence_logprobs(model, seqs: list[list[int]], top_k: int = 0, piece: int | None = None) -> list[TokenScores]:
    """For each sequence of T >= 1 ids, the scores of its tokens 1..T-1 (the first token has no
    context). The sequences, right-padded, go through a private ``KVCache`` in pieces of
    ``piece`` positions (default: :func:`piece_for`), so memory is that cache plus one piece's
    logits, however long they are."""
    from llama4.infer.kv_cache import KVCache

    if not seqs or any(len(s) < 1 for s in seqs):
        raise ValueError("sequence_logprobs: every sequence needs at least one token")
    V = model.args.vocab_size
    bad = next((t for s in seqs for t in s if not isinstance(t, int) or not 0 <= t < V), None)
    if bad is not None:
        raise ValueError(f"sequence_logprobs: token id {bad!r} is outside the vocabulary [0, {V})")
    R, T = len(seqs), max(len(s) for s in seqs)
    x = torch.zeros(R, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    scorer = _ScorePieces(model, x[:, 1:], top_k)
    if T > 1:
        device = next(model.parameters()).device
        cache = KVCache.for_model(model, R, T - 1)
        cache.prefill(scorer, x[:, :-1].to(device), range(0, R), piece=piece or piece_for(R, V))
    empty = next_token_scores(torch.zeros(0, V), torch.zeros(0, dtype=torch.long), top_k)
    return [TokenScores.cat(row)[:len(s) - 1] if row else empty for row, s in zip(scorer.rows, seqs)]
