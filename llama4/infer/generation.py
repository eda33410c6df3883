"""The simple generation path: prefill each prompt in pieces, then decode the batch together.

    new_ids = llama4.generate(model, prompt_ids, max_new_tokens=32)          # greedy
    for ids in generate_stream(model, prompt_ids, 64, temperature=0.8): ...  # streaming

Prompts of different lengths are each prefilled on their own and then decoded together with
per-row positions, so every row gets exactly the tokens it would get alone. The decode loop
keeps tokens on the device and reads them back only every ``sync_every`` steps (to stream them
and to notice stop tokens), like gpt-fast.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from llama4.infer.kv_cache import KVCache
from llama4.infer.sampling import Sampler, SamplingParams
from llama4.infer.step import DecodeStep


def _as_prompts(prompt_ids) -> tuple[list[list[int]], bool]:
    """-> (list of prompts, whether a single prompt was given)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.tolist()], True
        if prompt_ids.dim() == 2:
            return prompt_ids.tolist(), False
        raise ValueError(f"prompt_ids tensor must be 1-D or 2-D, got shape {tuple(prompt_ids.shape)}")
    prompts = list(prompt_ids)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts], True
    if prompts and all(isinstance(p, (list, tuple)) for p in prompts):
        return [list(p) for p in prompts], False
    raise ValueError("prompt_ids must be a list of token ids, a list of such lists, or a tensor")


def _as_images(model, pixel_values, n: int) -> list:
    """One tile tensor (or None) per prompt."""
    if pixel_values is None:
        return [None] * n
    images = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
    if len(images) != n:
        raise ValueError(f"pixel_values: {len(images)} entries for {n} prompts (one tensor or None per prompt)")
    if any(im is not None for im in images) and not hasattr(model, "embed"):
        raise ValueError("this model has no vision tower; it cannot take images")
    return images


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = next((t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad!r} is outside the vocabulary [0, {vocab_size})")


@torch.no_grad()
def generate_stream(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int | None = None, seed: int | None = None, stop: Iterable[int] | None = None, *,
                    prefill_chunk: int = 2048, sync_every: int = 16, compile: bool = False,
                    pixel_values=None) -> Iterator[list[list[int]]]:
    """Yields, every ``sync_every`` decode steps, the new token ids of each row since the last
    yield (an empty list for rows that are done). A row ends after its first stop token (which
    is included) or after ``max_new_tokens`` tokens. ``compile`` runs the decode steps through
    ``torch.compile`` (see ``llama4.infer.step``; the first call compiles for seconds).
    ``pixel_values``: image tiles for a `MultimodalTransformer`, one tensor (or None) per prompt
    (a bare tensor for a single prompt), consumed at prefill (``llama4.vision.prompt``)."""
    prompts, _ = _as_prompts(prompt_ids)
    images = _as_images(model, pixel_values, len(prompts))
    _check_prompts(prompts, model.args.vocab_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    params = SamplingParams(temperature, top_p, top_k, seed)
    stop_ids = frozenset(int(t) for t in (stop or ()))
    B = len(prompts)
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    cache = KVCache.for_model(model, B, max(len(p) for p in prompts) + max_new_tokens, static=compile)
    step = DecodeStep(model, compile=compile)
    sampler = Sampler(B, device)
    logits = []
    for r, p in enumerate(prompts):
        sampler.set_row(r, params)
        ids = torch.tensor([p], device=device)
        embeds = None if images[r] is None else model.embed(ids, images[r].to(device))
        logits.append(cache.prefill(model, ids, r, piece=prefill_chunk, embeds=embeds))
        cache.set_decoding(r, True)
    tok = sampler(torch.cat(logits))  # (B,)
    pending = [tok]
    counts = [0] * B
    done = [False] * B
    steps = 1
    while True:
        if len(pending) == sync_every or steps == max_new_tokens:
            new = torch.stack(pending, 1).tolist()  # the only device -> host read
            pending = []
            out = []
            for r in range(B):
                ids = []
                if not done[r]:
                    for t in new[r]:
                        ids.append(t)
                        counts[r] += 1
                        if t in stop_ids or counts[r] == max_new_tokens:
                            done[r] = True
                            cache.set_decoding(r, False)
                            break
                out.append(ids)
            yield out
            if all(done):
                return
        n = B if compile else cache.n_rows()  # compiled: finished rows keep their place, no new shape
        logits = cache.decode(step, tok[:n].view(n, 1))
        tok = sampler(logits)
        if n < B:  # rows past n are done; keep the shape for stacking
            tok = torch.cat([tok, tok.new_zeros(B - n)])
        pending.append(tok)
        steps += 1


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int | None = None, seed: int | None = None, stop: Iterable[int] | None = None, *,
             prefill_chunk: int = 2048, sync_every: int = 16, compile: bool = False,
             pixel_values=None) -> list[int] | list[list[int]]:
    """New token ids for one prompt (a list of ids) or for each of several prompts.

    ``temperature=0`` is greedy. ``stop`` token ids end a sequence (the stop token is the last
    id returned). Rows of a batch are independent: each gets the tokens it would get alone
    (with ``seed``, each row's sampling stream is seeded alike). ``pixel_values`` as in
    `generate_stream`.
    """
    prompts, single = _as_prompts(prompt_ids)
    result: list[list[int]] = [[] for _ in prompts]
    for chunk in generate_stream(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop,
                                 prefill_chunk=prefill_chunk, sync_every=sync_every, compile=compile,
                                 pixel_values=pixel_values):
        for r, ids in enumerate(chunk):
            result[r].extend(ids)
    return result[0] if single else result


def full_forward_greedy(model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Reference: greedy decoding by re-running the whole sequence without a cache."""
    ids = torch.tensor([list(prompt)], device=next(model.parameters()).device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(ids, last_only=True)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt):].tolist()
