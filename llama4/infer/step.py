"""The decode step: the model called on one new token per row, set up for speed.

These choices are made here, outside the model:

* **MoE path.** The model's default ("grouped") sorts tokens by expert and runs one grouped
  matmul; that is best for prefill and wide batches. For a handful of decode tokens the
  "gather" path (each token multiplies its experts' weights, indexed directly, as gpt-fast does)
  skips the sort and the empty experts; off the CPU it also avoids reading expert counts back
  to the host (the grouped kernel exists only for bf16 on Hopper GPUs; the fallback loop syncs).
* **torch.compile** (optional, gpt-fast style). A decode step is ~100 small ops per layer; in
  eager mode their dispatch costs as much as the matmuls. Compiled, the elementwise ops fuse.
  The weights stay graph inputs, not frozen constants, so a model trained further in the same
  process decodes with its current weights (measured: inductor freezing would add 14% at batch 8
  and nothing at batch 1). It compiles once per cache shape: the KV cache runs in
  ``static`` mode (every step exposes the whole capacity, masked, over all rows), and the MoE
  uses the gather path (no data-dependent shapes).
* **Matmuls of a few rows on the CPU are reductions** (compiled only). A decode step's matmul is
  a matrix-vector product: it only has to stream the weights once. The CPU BLAS behind
  ``aten::mm`` streams an ``nn.Linear`` weight at ~9 GB/s on our AMD EPYC (measured, 1 thread),
  while inductor's vectorized reduction over the contiguous input dimension reads at the
  machine's ``sum()`` bandwidth (~26-30 GB/s). So, for up to ``SMALL_ROWS`` rows, ``mm``/``bmm``
  are lowered as ``(x[:, None, :] * W[None, :, :]).sum(-1)``, and the routed experts' weights
  (stored ``x @ W``, [E, in, out], as Meta and HF store them) are re-laid out in memory as
  [E, out, in] with the same shape and values (a strided view), so their reduction dimension is
  contiguous too. The reduction streams the weights once per row (measured over 48 MB of
  weights: 21.6 GB/s at 1 row, 7.9 at 4, 4.6 at 8, where MKL gives 5.1), so BLAS keeps wider
  steps.
* **Its own thread count** (compiled, CPU). Inductor bakes the thread count into the kernels it
  generates, and a decode step is ~40 small parallel regions, each paying a thread hand-off: on
  our 2-core VM two threads made the fp32 step 1.4x faster with OpenMP's default wait policy and
  3x slower with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep between regions). So the step measures
  a proxy of itself (a chain of the model's one-row FFN matmuls, compiled by the same backend) at
  one thread and at torch's count, compiles for the faster, and runs every call under it.
  Eager, one-row steps do the same with the model's own FFNs called eagerly (``eager_decode_threads``):
  their one-row BLAS calls do not split across threads, so a second one mostly adds hand-offs.
* **One graph per step, without Dynamo** (compiled, CPU, static cache: ``DecodeStep.decode_whole``).
  ``KVCache.decode`` hands the step its whole device side (the write plan built from the rows'
  positions, the model, the position advance), traced once per signature by ``make_fx`` over flat
  tensors (tokens, the cache's tensors, every weight) and compiled by the backend below. A call is
  then one C++ graph call: no guards, no host-built plan tensors, no module call (measured on
  the benchmark shape, 1 thread: 1.32x the Dynamo path in fp32, 1.13-1.23x quantized).
* **Guard-light calls** (compiled, called directly or under grad mode). Once a call shape has
  passed Dynamo's full guards, later calls of that shape skip them (0.3 ms per CPU step). That is
  safe because of the invariant stated at ``DecodeStep._run``: with a static cache, everything the
  graph specializes on is a function of the call's signature.

The eager path with the model's own MoE is the reference; tests check they agree.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import weakref

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from llama4.model.moe import GroupedExperts, MoE

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# model -> (its compiled decode function, the thread count its kernels were generated for,
#           {signature: whole-step graph} (DecodeStep.decode_whole))
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


SMALL_ROWS = 4  # measured: reductions beat MKL up to 4 rows (2x at 1 row), tie at 8


def _small_mm(a: torch.Tensor, b: torch.Tensor):
    # (M, K) @ (K, N) with W = b.t() stored (N, K): read once, K innermost
    if a.device.type == "cpu" and a.shape[0] <= SMALL_ROWS and b.stride(0) == 1:
        return (a.unsqueeze(1) * b.t().unsqueeze(0)).sum(-1)
    return NotImplemented


def _small_bmm(a: torch.Tensor, b: torch.Tensor):
    # (B, M, K) @ (B, K, N), K contiguous in b: the gathered experts' weights (attention does not
    # get here: SDPA reaches inductor as the CPU flash-attention op)
    if a.device.type == "cpu" and a.shape[1] <= SMALL_ROWS and b.stride(1) == 1:
        return (a.unsqueeze(2) * b.transpose(1, 2).unsqueeze(1)).sum(-1)
    return NotImplemented


@functools.cache
def _cpu_decode_backend():
    """Inductor with the default decompositions plus the few-row matmuls above, and a C++
    wrapper around the kernels (measured: ~0.2 ms less Python per step)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    table = dict(select_decomp_table())
    default_mm = table.get(aten.mm.default)

    def mm(a, b):
        out = _small_mm(a, b)
        return default_mm(a, b) if out is NotImplemented and default_mm is not None else out

    table[aten.mm.default] = mm
    table[aten.bmm.default] = _small_bmm
    return functools.partial(compile_fx, decompositions=table, config_patches={"cpp_wrapper": True})


def compile_for_decode(fn, inputs, tracing_mode: str = "real"):
    """``fn`` compiled by the CPU decode backend for torch's current thread count, called without
    Dynamo (no guards, no recompile limit): timed candidate kernels, the whole decode step.
    ``tracing_mode="fake"`` traces without running ``fn`` (no side effects on the inputs).
    -> f(list of inputs)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode=tracing_mode)(*inputs)
    for node in gm.graph.nodes:  # inductor re-derives them in its own fake mode
        node.meta.clear()
    compiled = _cpu_decode_backend()(gm, inputs)
    return lambda args: compiled(*args)


def best_time(fn, inputs, reps: int, rounds: int = 7) -> float:
    """Best of ``rounds`` (a shared machine only ever adds time), seconds per call of fn(inputs)."""
    for _ in range(3):
        fn(inputs)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn(inputs)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


THREADS_MARGIN = 1.05  # more threads must beat one by this much on the proxy: one is the safe side
# fp32 weight bytes a timing streams (the thread proxy here, quant/fused.py's per-layer timing): a
# decode step reads every layer between two reads of one, so its weights come from L3 or DRAM, never
# L2; 4 MB did not do that (two cores' L2 held it). Bounded, so big models time quickly.
TIMING_BYTES = 32e6


@functools.cache
def _proxy_times(threads: int, dim: int, ffn: int, pairs: int) -> tuple[float, float]:
    """(seconds at 1 thread, at ``threads``) of a chain of ``pairs`` one-row FFNs, dim -> ffn -> dim,
    each compiled by the decode backend for that thread count."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*shape, generator=g) * dim ** -0.5 for _ in range(pairs) for shape in ((ffn, dim), (dim, ffn))]
    x = torch.randn(1, dim, generator=g)

    def chain(x, *ws):
        for w1, w2 in zip(ws[0::2], ws[1::2]):
            x = x + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, w1)), w2)
        return x

    def measure():
        with torch.no_grad():
            return best_time(compile_for_decode(chain, [x, *ws]), [x, *ws], reps=20, rounds=5)

    return _at_one_and(threads, measure)


def _at_one_and(threads: int, measure) -> tuple[float, float]:
    """(measure() at 1 thread, at ``threads``), torch's count restored after."""
    saved, out = torch.get_num_threads(), []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            out.append(measure())
    finally:
        torch.set_num_threads(saved)
    return out[0], out[1]


def decode_threads(model: torch.nn.Module, quiet: bool = False) -> int:
    """Threads for the model's compiled CPU decode step: torch's count if a proxy step ran at least
    ``THREADS_MARGIN`` faster with them than with one thread, else one. Says which once (stderr)."""
    n = torch.get_num_threads()
    if n == 1:
        return 1
    a = model.args
    dim = a.dim
    ffn = max(a.dense_dim or 0, a.expert_dim or 0, dim)
    pair = 2 * dim * ffn * 4
    pairs = max(1, min(a.n_layers, int(TIMING_BYTES // pair)))
    ffn = min(ffn, max(dim, int(TIMING_BYTES // (8 * dim))))  # one pair of a very wide model, capped
    t1, tn = _proxy_times(n, dim, ffn, pairs)
    pick = n if t1 / tn >= THREADS_MARGIN else 1
    if not quiet:
        _say_threads(pick, n, t1 / tn)
    return pick


@functools.cache
def _say_threads(pick: int, n: int, speedup: float, what: str = "compiled for") -> None:
    print(f"llama4 decode: {what} {pick} thread(s) (a proxy step ran {speedup:.2f}x as fast on {n} "
          f"threads as on 1; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})", file=sys.stderr)


# model -> {torch's thread count: the count its eager one-row decode steps run at}
_eager_threads: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, int]]" = weakref.WeakKeyDictionary()


def eager_decode_threads(model: torch.nn.Module, moe_path=contextlib.nullcontext, quiet: bool = False) -> int:
    """Threads for the model's eager CPU decode steps of one row: torch's count if the model's own
    FFNs (dense and MoE, under ``moe_path()``), called eagerly on one row, ran at least
    ``THREADS_MARGIN`` faster with them than with one thread, else one. A one-row eager step is
    ~1,000 small ops and one-row BLAS calls that do not split across threads (measured on the
    benchmark shape, AMD EPYC, 2 threads: 0.85-1.0x one thread, while batch 8 gained 1.25x), so
    a second thread mostly adds hand-offs. Measured once per model and thread count over at most
    ``TIMING_BYTES`` of its FFN weights; says so (stderr) when it picks fewer than torch's count."""
    from llama4.model.transformer import TransformerBlock

    n = torch.get_num_threads()
    if n == 1:
        return 1
    known = _eager_threads.setdefault(model, {})
    if n in known:
        return known[n]
    ffns, nbytes = [], 0
    for block in (m for m in model.modules() if isinstance(m, TransformerBlock)):
        if ffns and nbytes >= TIMING_BYTES:
            break
        ffns.append(block.feed_forward)
        nbytes += sum(t.numel() * t.element_size() for t in block.feed_forward.state_dict().values())
    p = next(model.parameters())
    x = torch.randn(1, 1, model.args.dim, dtype=p.dtype, device=p.device)

    def chain(_):
        for f in ffns:
            f(x)

    with torch.no_grad(), moe_path():
        t1, tn = _at_one_and(n, lambda: best_time(chain, None, reps=4, rounds=5))
    pick = known[n] = n if t1 / tn >= THREADS_MARGIN else 1
    if pick != n and not quiet:
        _say_threads(pick, n, round(t1 / tn, 2), "eager one-row steps on")
    return pick


def relayout_experts_for_decode(model: torch.nn.Module) -> None:
    """Store each routed expert's weights [out, in]-contiguous, in place: same shapes, values and
    parameters (a transposed view of new storage), so a decode-time reduction over ``in`` reads
    contiguous memory. Checkpoint writers copy to contiguous; every matmul accepts the strides."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                for p in (m.w1, m.w2, m.w3):
                    if p.stride(-2) != 1:
                        p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)


class DecodeStep:
    """Called like the model: ``step(tokens, positions=, cache=) -> logits``."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        self.model = model
        self.moe = [m for m in model.modules() if isinstance(m, MoE)]
        self.top_k = model.args.top_k
        self.on_cpu = next(model.parameters()).device.type == "cpu"
        self.fn = model
        self.threads = None  # compiled: every call's thread count (None: torch's current count)
        self.one_row_threads = None  # eager: one-row calls' (None: torch's)
        self.compiled = compile
        self._graphs: dict = {}  # whole-step graphs by signature, shared by the model's compiled steps
        if compile:
            fn, threads, graphs = _compiled.get(model, (None, None, {}))  # compiling takes seconds: once per model
            if fn is None and self.on_cpu:
                threads = decode_threads(model)
                saved = torch.get_num_threads()
                torch.set_num_threads(threads)  # the fused kernels are timed at the count they will run at
                try:
                    if getattr(model, "quantization", None):
                        from llama4.quant.apply import prepare_compiled  # quantized weights: fused reductions

                        prepare_compiled(model)
                finally:
                    torch.set_num_threads(saved)
                relayout_experts_for_decode(model)
                fn = torch.compile(model, dynamic=False, backend=_cpu_decode_backend())
            elif fn is None:
                fn = torch.compile(model, dynamic=False)
            _compiled[model] = (fn, threads, graphs)
            self.fn, self.threads, self._graphs = fn, threads, graphs
        elif self.on_cpu:
            self.one_row_threads = eager_decode_threads(model, lambda: self._moe(1))
        self._warm: set[tuple] = set()  # signatures this step has already run compiled
        # where each parameter and buffer lives: a whole-step call reads the current tensors
        self._weights = [(mod._parameters if name in mod._parameters else mod._buffers, name)
                         for full in self._weight_names()
                         for mod, name in [self._owner(full)]] if compile else []

    def _weight_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()] + [n for n, _ in self.model.named_buffers()]

    def _owner(self, full: str) -> tuple[torch.nn.Module, str]:
        prefix, _, name = full.rpartition(".")
        return self.model.get_submodule(prefix), name

    def decode_whole(self, cache, tokens: torch.Tensor) -> torch.Tensor | None:
        """A compiled CPU step over a static cache: the whole device side of ``cache.decode``
        (write plan, model, position advance: ``KVCache.decode_forward``) as ONE inductor graph of
        flat tensors (tokens, the cache's ``state_tensors``, every parameter and buffer), called
        without Dynamo: no guards, no per-call plan tensors built on the host, no nn.Module call
        (measured: 0.24 ms less per step on a tiny model, 0.4 ms on the benchmark shape).
        -> logits (n, V), or None where it does not apply (eager, off the CPU, a dynamic cache,
        grad mode): then the caller runs ``decode_forward`` through this step as before.

        One graph per signature (rows, cache rows, capacity, dtype, training), traced with
        ``make_fx`` and compiled by the decode backend. It reads the weights current at each call
        (in-place updates are seen) but bakes their shapes, dtypes and strides and the model's
        structure in, as ``_run``'s guard skipping does: replace parameters with differently
        laid-out ones, and make a new model's step."""
        if not (self.compiled and self.on_cpu and cache.static) or torch.is_grad_enabled():
            return None
        sig = (tokens.shape, tokens.dtype, cache.max_batch, cache.capacity, cache.dtype, self.model.training)
        graph = self._graphs.get(sig)
        with self._at_threads():
            if graph is None:
                graph = self._graphs[sig] = self._trace_whole(cache, tokens)
            return graph([tokens, *cache.state_tensors(), *[d[k] for d, k in self._weights]])

    def _trace_whole(self, cache, tokens: torch.Tensor):
        from torch.func import functional_call

        names = self._weight_names()
        n_state = len(cache.state_tensors())

        def whole(tokens, *flat):
            state, weights = flat[:n_state], dict(zip(names, flat[n_state:]))
            with cache.bound_to(list(state)), self._moe(tokens.shape[0]):
                return cache.decode_forward(lambda t, **kw: functional_call(self.model, weights, (t,), kw), tokens)

        inputs = [tokens, *cache.state_tensors(), *[d[k] for d, k in self._weights]]
        # is_compiling() as under torch.compile: quantized layers then trace their fused reductions
        with torch.no_grad(), torch.compiler._compile_session_context():
            return compile_for_decode(whole, inputs, tracing_mode="fake")

    def _signature(self, tokens: torch.Tensor, positions: torch.Tensor, cache, kw: dict) -> tuple:
        """What the compiled graph specializes on: the shapes of everything it reads (the cache's
        are fixed by its rows and capacity), dtypes, grad mode and the plain arguments."""
        def key(v):
            return (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v
        return (key(tokens), key(positions), cache.max_batch, cache.capacity, cache.static, cache.dtype,
                cache.device, torch.is_grad_enabled(), self.model.training,
                tuple(sorted((k, key(v)) for k, v in kw.items())))

    def _run(self, tokens, positions, cache, kw):
        """Call the model, compiled or not.

        Dynamo re-checks ~100 guards (every parameter, every cache tensor) before each call:
        0.3 ms, a tenth of a CPU decode step. Once a signature has run through the full guards,
        its next calls run under ``skip_guard_eval_unsafe``, which only checks the guards that
        tell this frame's compiled graphs apart, so it would run a stale graph if something the
        full guards check had changed while the signature stayed the same. It cannot, because:

        * The cache is static (enforced here). Its buffers' shapes follow from (max_batch,
          capacity, dtype, device), replaced only when ``reserve`` raises the capacity; its decode
          plan's Python values are fixed by the signature too: ``n`` is the tokens' rows, every
          layer exposes its whole buffer (``full_keys`` = capacity, ``ring_keys`` = ring size) and
          the masks are always tensors of shape (n, 1, 1, keys). A dynamic cache exposes a key
          count that changes every step, with the same signature: it must never skip guards.
        * The model's structure is fixed while it decodes: the MoE path is forced to "gather" for
          every compiled call (``moe_impl``), training mode and grad mode are in the signature,
          and the weights change only in place (an optimizer step, ``load_state_dict``), keeping
          their shapes, dtypes and strides (the expert re-layout happens before compiling).
          Replacing parameters or buffers with differently laid-out tensors, or calling under
          autocast, between calls of one ``DecodeStep`` breaks this; make a new ``DecodeStep``
          (its set of warm signatures starts empty).
        """
        if not self.compiled:
            return self.fn(tokens, positions=positions, cache=cache, **kw)
        if not cache.static:
            raise ValueError("a compiled DecodeStep needs a KVCache made with static=True (its shapes "
                             "must not change between calls that skip Dynamo's guards)")
        sig = self._signature(tokens, positions, cache, kw)
        if sig not in self._warm:
            out = self.fn(tokens, positions=positions, cache=cache, **kw)
            self._warm.add(sig)
            return out
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.fn(tokens, positions=positions, cache=cache, **kw)

    def moe_impl(self, n_tokens: int) -> str | None:
        """The MoE path for a step of ``n_tokens`` tokens (None: keep the model's)."""
        if self.compiled or not self.on_cpu or n_tokens * self.top_k <= 2:
            return "gather"
        return None

    @contextlib.contextmanager
    def _moe(self, n_tokens: int):
        """The MoE path of a step of ``n_tokens`` tokens, for the duration of the block."""
        impl = self.moe_impl(n_tokens) if self.moe else None
        saved = [m.impl for m in self.moe]
        if impl is not None:
            for m in self.moe:
                m.impl = impl
        try:
            yield
        finally:
            for m, old in zip(self.moe, saved):
                m.impl = old

    @contextlib.contextmanager
    def _at_threads(self, rows: int = 0):
        """torch's thread count set to the step's for the block (compiled: inductor generates the
        kernels for the count at hand; eager: one-row calls), then restored."""
        saved = torch.get_num_threads()
        threads = self.threads if self.compiled else (self.one_row_threads if rows == 1 else None)
        switch = threads is not None and threads != saved
        if switch:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if switch:
                torch.set_num_threads(saved)

    def __call__(self, tokens: torch.Tensor, *, positions, cache, **kw) -> torch.Tensor:
        with self._at_threads(tokens.shape[0]), self._moe(tokens.shape[0]):
            if self.on_cpu:
                return self._run(tokens, positions, cache, kw)
            # cuDNN attention builds a new plan for every new key length, i.e. every decode step
            # (measured on an H100: 10 ms per call in bf16); the other kernels have no such cost.
            with sdpa_kernel(_NO_CUDNN):
                return self._run(tokens, positions, cache, kw)
