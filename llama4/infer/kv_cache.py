"""KV cache that follows iRoPE: a ring of one chunk on chunked (RoPE) layers, the full history on
global (NoPE) layers.

One :class:`KVCache` serves a batch of ``max_batch`` sequence slots ("rows"). Each row has its
own length, so rows hold unrelated requests that join and leave between decode steps. The model
calls ``cache[i].update(k, v)`` (the ``LayerKVCache`` protocol of ``llama4.model.attention``).
What to write where is decided on the host beforehand: :meth:`KVCache.prefill` /
:meth:`KVCache.decode` compute a plan (``_Prefill`` / ``_Decode``) from lengths the host already
knows, so the decode step never reads a device value back, and hold it in ``KVCache.plan`` for
the duration of that one model call. Each layer's ``update`` is ``write(k, v, plan)`` with that
plan: the plan, not the positions the model was called with, says where keys go.

Chunked layer (chunk C): a query at position p sees the keys of its own chunk up to p, i.e. at most
C-1 earlier keys. Position p lives in ring slot ``p % C``; because chunks start at multiples of C,
the current chunk's keys are slots 0 .. p % C in order, and a slot is only overwritten once its
chunk is over. Memory: C (or the capacity, if smaller) per row and layer, whatever the context.

Global layer: slot p holds position p; the buffer grows by doubling (amortised copies).

Both kinds keep one scratch slot past their end: a decode step runs over rows [0, n) and the rows
in that range that are not decoding (free, or mid-prefill) write there, so they never disturb
real keys and no row has to be gathered out of the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from llama4.infer.masks import PieceMask
from llama4.model.args import ModelArgs


@dataclass
class _Prefill:
    r0: int
    r1: int
    start: int
    T: int


@dataclass
class _Decode:
    n: int
    rows: torch.Tensor  # (n, 1): 0 .. n-1
    full_idx: torch.Tensor  # (n, 1) write slot per row on global layers
    ring_idx: torch.Tensor | None  # (n, 1) write slot per row on chunked layers
    full_keys: int  # keys exposed on global layers
    ring_keys: int
    full_mask: torch.Tensor | None  # (n, 1, 1, full_keys) or None: all visible
    ring_mask: torch.Tensor | None


class _LayerCache:
    """One layer's keys and values for every row (``write`` puts a forward's new ones where its plan
    says and returns what the queries see)."""

    def __init__(self, kv: "KVCache", size: int):
        self.kv = kv
        shape = (kv.max_batch, kv.n_kv_heads, size + 1, kv.head_dim)  # +1: the scratch slot
        self.k = torch.zeros(shape, device=kv.device, dtype=kv.dtype)
        self.v = torch.zeros(shape, device=kv.device, dtype=kv.dtype)

    @property
    def size(self) -> int:
        return self.k.shape[2] - 1

    def resize(self, size: int) -> None:
        old = self.size
        if size == old:
            return
        k, v = self.k, self.v
        shape = (k.shape[0], k.shape[1], size + 1, k.shape[3])
        self.k = torch.zeros(shape, device=k.device, dtype=k.dtype)
        self.v = torch.zeros(shape, device=k.device, dtype=k.dtype)
        keep = min(old, size)
        self.k[:, :, :keep] = k[:, :, :keep]
        self.v[:, :, :keep] = v[:, :, :keep]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """The model's hook (``LayerKVCache``): write with the plan of the model call in progress."""
        plan = self.kv.plan
        if plan is None:
            raise RuntimeError("KVCache: call the model through KVCache.prefill or KVCache.decode, "
                               "which plan its writes")
        return self.write(k, v, plan)

    def write(self, k: torch.Tensor, v: torch.Tensor, plan: "_Prefill | _Decode"):
        raise NotImplementedError

    def _write_decode(self, rows: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (n, n_kv, 1, hd); rows, idx: (n, 1). An index_put_ on the whole buffer, not a
        # scatter_ into the view k[:n]: compiled, the view's mutation made inductor copy the
        # whole cache out and back per layer and step (measured: 4x the cache's bytes).
        where = (rows, self.kv._heads, idx)
        self.k.index_put_(where, k[:, :, 0])
        self.v.index_put_(where, v[:, :, 0])

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class FullLayerCache(_LayerCache):
    """Global (NoPE) layer: the whole history, slot = position."""

    def write(self, k, v, plan):
        if isinstance(plan, _Decode):
            self._write_decode(plan.rows, plan.full_idx, k, v)
            S = plan.full_keys
            return self.k[:plan.n, :, :S], self.v[:plan.n, :, :S], plan.full_mask
        r0, r1, s, T = plan.r0, plan.r1, plan.start, plan.T
        self.k[r0:r1, :, s:s + T] = k
        self.v[r0:r1, :, s:s + T] = v
        return self.k[r0:r1, :, :s + T], self.v[r0:r1, :, :s + T], PieceMask(s, T, None)


class ChunkedLayerCache(_LayerCache):
    """Chunked (RoPE) layer: a ring of one chunk, slot = position % chunk."""

    def __init__(self, kv: "KVCache", size: int, chunk: int):
        super().__init__(kv, size)
        self.chunk = chunk

    def write(self, k, v, plan):
        if isinstance(plan, _Decode):
            self._write_decode(plan.rows, plan.ring_idx, k, v)
            S = plan.ring_keys
            return self.k[:plan.n, :, :S], self.v[:plan.n, :, :S], plan.ring_mask
        r0, r1, s, T, C = plan.r0, plan.r1, plan.start, plan.T, self.chunk
        n_old = s % C  # earlier keys of the current chunk: slots 0 .. n_old-1
        if n_old + T <= C:  # the piece stays inside one chunk: write in place, return a view
            self.k[r0:r1, :, n_old:n_old + T] = k
            self.v[r0:r1, :, n_old:n_old + T] = v
            return self.k[r0:r1, :, :n_old + T], self.v[r0:r1, :, :n_old + T], PieceMask(n_old, T, C)
        k_all = torch.cat([self.k[r0:r1, :, :n_old], k], dim=2)  # (R, n_kv, n_old + T, hd)
        v_all = torch.cat([self.v[r0:r1, :, :n_old], v], dim=2)
        m = (s + T - 1) % C + 1  # the last chunk's keys in this piece go to slots 0 .. m-1
        self.k[r0:r1, :, :m] = k[:, :, T - m:]
        self.v[r0:r1, :, :m] = v[:, :, T - m:]
        return k_all, v_all, PieceMask(n_old, T, C)


def static_capacity(capacity: int) -> int:
    """A static cache's capacity: ``capacity`` rounded up to 2^k or 1.5 * 2^k (at least 256). Every
    step attends over the whole capacity, so this keeps it under 1.34x what is used (577 -> 768,
    where powers of two gave 1024) at two compiled graphs per doubling of the length."""
    p = 1 << (capacity - 1).bit_length()
    return max(256, 3 * p // 4 if capacity <= 3 * p // 4 else p)


class KVCache:
    """Per-layer caches for ``max_batch`` rows, plus each row's length and decode state.

    ``capacity`` is the longest sequence (prompt + generated) a row may hold; :meth:`reserve`
    raises it. ``static=True`` makes every decode step expose the same shapes (the whole
    capacity, masked), which is what a compiled decode step needs.
    """

    def __init__(self, args: ModelArgs, max_batch: int, capacity: int, *, device=None,
                 dtype: torch.dtype = torch.float32, static: bool = False):
        if max_batch < 1 or capacity < 1:
            raise ValueError(f"KVCache needs max_batch >= 1 and capacity >= 1, got {max_batch}, {capacity}")
        self.max_batch = max_batch
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.hd
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.static = static
        if static:  # round up, so calls with similar lengths share one compiled graph
            capacity = static_capacity(capacity)
        self.chunk = args.attention_chunk_size
        self.capacity = capacity
        self.layers: list[_LayerCache] = []
        for i in range(args.n_layers):
            if self.chunk is not None and not args.is_nope_layer(i):
                self.layers.append(ChunkedLayerCache(self, min(self.chunk, capacity), self.chunk))
            else:
                self.layers.append(FullLayerCache(self, capacity))
        self.lengths = [0] * max_batch  # tokens stored per row (host)
        self.decoding = [False] * max_batch  # rows taking part in decode steps (host)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # next position
        self.active = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self.plan: _Prefill | _Decode | None = None  # of the model call in progress (prefill, decode)
        self._arange = torch.arange(capacity, device=self.device)
        self._rows = torch.arange(max_batch, device=self.device).view(max_batch, 1)
        self._heads = torch.arange(args.n_kv_heads, device=self.device).view(1, args.n_kv_heads)

    @classmethod
    def for_model(cls, model, max_batch: int, capacity: int, static: bool = False) -> "KVCache":
        p = next(model.parameters())
        return cls(model.args, max_batch, capacity, device=p.device, dtype=p.dtype, static=static)

    # --- the LayerKVCache list the model indexes --------------------------------------------
    def __getitem__(self, i: int) -> _LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    # --- rows -------------------------------------------------------------------------------
    def reserve(self, capacity: int) -> None:
        """Make room for sequences of ``capacity`` tokens (doubling, so growth is amortised)."""
        if capacity <= self.capacity:
            return
        new = max(capacity, 2 * self.capacity)
        if self.static:
            new = static_capacity(new)
        for layer in self.layers:
            if isinstance(layer, ChunkedLayerCache):
                layer.resize(min(self.chunk, new))
            else:
                layer.resize(new)
        self.capacity = new
        self._arange = torch.arange(new, device=self.device)

    def reset(self, row: int) -> None:
        """Forget a row's contents (its slot is then free for another sequence)."""
        self.lengths[row] = 0
        self.set_decoding(row, False)

    def set_decoding(self, row: int, on: bool) -> None:
        """Add a prefilled row to (or remove it from) the decode steps. No device read."""
        self.decoding[row] = on
        self.active[row] = on
        self.pos[row] = self.lengths[row] if on else 0

    def n_rows(self) -> int:
        """Decode steps run over rows [0, n_rows): up to the last decoding row. In static mode that
        is rounded up to a power of two (at most ``max_batch``): a compiled step then has at most
        log2(max_batch) + 1 shapes, and a lone request decodes 1 row, not ``max_batch``."""
        last = max((r + 1 for r in range(self.max_batch) if self.decoding[r]), default=0)
        if self.static and last:
            return min(self.max_batch, 1 << (last - 1).bit_length())
        return last

    # --- forward passes ---------------------------------------------------------------------
    def prefill(self, model, tokens: torch.Tensor, rows: range | int = 0, piece: int = 2048,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens`` (R, T) to rows ``rows`` (consecutive, all of the same length) in pieces
        of at most ``piece`` tokens; returns the logits (R, V) after the last token. ``embeds``
        (R, T, D), when given, are fed instead of the token embeddings (a multimodal prompt with
        its image features merged in: ``MultimodalTransformer.embed``).

        Piece ends are aligned to multiples of ``piece`` so that, with a piece size that divides
        the chunk or is a multiple of it, pieces line up with chunk boundaries.
        """
        if isinstance(rows, int):
            rows = range(rows, rows + 1)
        r0, r1 = rows.start, rows.stop
        if tokens.dim() != 2 or tokens.shape[0] != r1 - r0 or tokens.shape[1] < 1:
            raise ValueError(f"prefill: tokens must be ({r1 - r0}, T>=1), got {tuple(tokens.shape)}")
        start = self.lengths[r0]
        if any(self.lengths[r] != start for r in rows):
            raise ValueError("prefill: rows of one call must hold the same number of tokens")
        T = tokens.shape[1]
        self.reserve(start + T)
        logits = None
        s = start
        while s < start + T:
            e = min(start + T, (s // piece + 1) * piece)
            self.plan = _Prefill(r0, r1, s, e - s)
            positions = torch.arange(s, e, device=self.device)
            try:
                logits = model(tokens[:, s - start:e - start], positions=positions, cache=self, last_only=True,
                               inputs_embeds=None if embeds is None else embeds[:, s - start:e - start])
            finally:
                self.plan = None
            s = e
        for r in rows:
            self.lengths[r] = start + T
            if self.decoding[r]:
                self.pos[r] = start + T
        return logits[:, -1]

    def decode(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """One token for every row in [0, n_rows()): tokens (n, 1) -> logits (n, V). ``model`` is
        the model or anything called like it (a compiled decode step).

        Rows that are not decoding compute garbage into the scratch slots. Advances the
        positions of decoding rows on the device and their lengths on the host. A compiled
        ``DecodeStep`` runs the device side (:meth:`decode_forward`) as one graph when it can
        (its ``decode_whole``; None where it cannot).
        """
        n = tokens.shape[0]
        rows = [r for r in range(n) if self.decoding[r]]
        if not rows:
            raise ValueError("decode: no row in the batch is decoding")
        need = max(self.lengths[r] for r in rows) + 1
        self.reserve(need)
        whole = getattr(model, "decode_whole", None)
        logits = whole(self, tokens) if whole is not None else None
        if logits is None:
            logits = self.decode_forward(model, tokens, rows, need)
        for r in rows:
            self.lengths[r] += 1
        return logits

    def decode_forward(self, model, tokens: torch.Tensor, rows: list[int] | None = None, need: int = 0
                       ) -> torch.Tensor:
        """The device side of a decode step: plan the writes, call ``model``, advance the decoding
        rows' positions -> logits (n, V). ``rows`` (the decoding rows) and ``need`` (their longest
        length + 1) are host values only a dynamic cache's plan reads. In static mode every tensor
        it reads or writes is one of :meth:`state_tensors` (or the model's) and its Python values
        follow from (n, max_batch, capacity): a compiled step may trace it whole (``bound_to``)."""
        n = tokens.shape[0]
        self.plan = self._decode_plan(n, rows, need)
        try:
            logits = model(tokens, positions=self.pos[:n].view(n, 1), cache=self)
        finally:
            self.plan = None
        self.pos[:n] += self.active[:n]
        return logits[:, -1]

    _STATE = ("pos", "active", "_arange", "_rows", "_heads")

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes, in a fixed order: the rows' positions and
        flags, index helpers, then each layer's keys and values."""
        return [getattr(self, a) for a in self._STATE] + [t for layer in self.layers for t in (layer.k, layer.v)]

    @contextmanager
    def bound_to(self, tensors: list[torch.Tensor]):
        """This cache over other tensors in place of :meth:`state_tensors` (a tracer's stand-ins)
        for the duration of the block; its own are put back after."""
        saved = self.state_tensors()
        try:
            self._bind(tensors)
            yield self
        finally:
            self._bind(saved)

    def _bind(self, tensors: list[torch.Tensor]) -> None:
        s = len(self._STATE)
        for a, t in zip(self._STATE, tensors[:s]):
            setattr(self, a, t)
        for i, layer in enumerate(self.layers):
            layer.k, layer.v = tensors[s + 2 * i], tensors[s + 2 * i + 1]

    def _decode_plan(self, n: int, rows: list[int] | None, need: int) -> _Decode:
        pos, act = self.pos[:n], self.active[:n]
        ring = next((layer for layer in self.layers if isinstance(layer, ChunkedLayerCache)), None)
        full_cap = self.capacity
        uniform = not self.static and len(rows) == n and len({self.lengths[r] for r in rows}) == 1
        # Global layers: keys 0 .. p per row.
        full_keys = full_cap if self.static else need
        full_mask = None
        if self.static or not uniform:
            full_mask = (self._arange[:full_keys] <= pos.unsqueeze(1)).view(n, 1, 1, full_keys)
        full_idx = torch.where(act, pos, full_cap).view(n, 1)
        ring_idx = ring_mask = None
        ring_keys = 0
        if ring is not None:
            size, C = ring.size, self.chunk
            slot = pos % C
            ring_keys = size if self.static else min(size, max(self.lengths[r] % C for r in rows) + 1)
            if self.static or not uniform:
                ring_mask = (self._arange[:ring_keys] <= slot.unsqueeze(1)).view(n, 1, 1, ring_keys)
            ring_idx = torch.where(act, slot, size).view(n, 1)
        return _Decode(n, self._rows[:n], full_idx, ring_idx, full_keys, ring_keys, full_mask, ring_mask)
