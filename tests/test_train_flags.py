"""The training flags change what runs, not only that a run finishes: under ``dtype=bfloat16``
the matmuls compute in bf16 (fp32 master weights), ``activation_checkpointing`` recomputes every
block during backward, and ``compile`` runs the compiled blocks. Each check also runs with the
flag off, so it would fail if the flag did nothing. The runs go through the trainer's own
``setup`` and ``train_step``, the path ``llama4 train --dtype / --activation-checkpointing /
--compile`` takes (``llama4/train/cli.py`` turns each flag into the config field used here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama4.model import MoE
from llama4.recipes import get_recipe
from llama4.train import TrainState, apply_overrides, setup, train_step
from llama4.train.state import Meter
from llama4.train.step import lm_loss


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A debug tokenizer and tokenized corpus (a few seconds), shared by the runs below."""
    from llama4.data import prepare_embedded_corpus
    from llama4.data.corpus import iter_corpus
    from llama4.tokenizer.bpe import train_tokenizer_file

    d = tmp_path_factory.mktemp("shared")
    cfg = get_recipe("debug")
    docs = [x.text for x in iter_corpus("train")][:: cfg.tokenizer_doc_stride]
    tok = train_tokenizer_file(docs, cfg.model.vocab_size, d / "tokenizer.model")
    prepare_embedded_corpus(tok, d / "data", progress=False)
    return [f"tokenizer={d / 'tokenizer.model'}", f"data_dir={d / 'data'}"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(shared, out, *sets):
    cfg = apply_overrides(get_recipe("debug"), [*shared, "progress=false", "threads=1", *sets])
    run = setup(cfg, out)
    return run, TrainState(meter=Meter(len(run.moe), cfg.model.n_experts))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bf16_autocast_runs_the_matmuls_in_bf16(tmp_path, shared, dtype):
    run, state = _run(shared, tmp_path / dtype, f"dtype={dtype}")
    assert run.compute_dtype == dtype
    seen: dict[str, set] = {}

    def record(name):
        return lambda _m, _inp, out: seen.setdefault(name, set()).add(out.dtype)

    matmuls = 0  # every projection (attention, shared expert, dense FFN, router, head) and the routed experts
    for name, m in run.model.named_modules():
        if isinstance(m, (nn.Linear, MoE)):
            target = m.experts if isinstance(m, MoE) else m
            target.register_forward_hook(record(f"{name}.experts" if isinstance(m, MoE) else name))
            matmuls += 1
    stats = train_step(run, state)
    assert len(seen) == matmuls > 10  # every hook fired
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert {n: d for n, d in seen.items() if d != {want}} == {}
    assert any(n.endswith("experts") for n in seen) and "output" in seen
    # fp32 master weights and fp32 gradients / optimizer state; the loss itself is fp32
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in run.optimizer.state.values()} == {torch.float32}
    assert torch.isfinite(torch.tensor(stats.loss)) and stats.applied


@pytest.mark.parametrize("ac", [True, False], ids=["ac", "no_ac"])
def test_activation_checkpointing_recomputes_blocks_in_backward(tmp_path, shared, ac):
    run, state = _run(shared, tmp_path / "r", f"activation_checkpointing={str(ac).lower()}", "grad_accum=2")
    phase, calls = ["idle"], []

    def loss_fn(r, batch):  # the step's loss seam: everything after it returns is backward
        phase[0] = "forward"
        out = lm_loss(r, batch)
        phase[0] = "backward"
        return out

    for i, block in enumerate(run.model.layers):
        for part in (block.attention, block.feed_forward):
            part.register_forward_pre_hook(lambda *_, i=i: calls.append((phase[0], i)))
    stats = train_step(run, state, loss_fn=loss_fn)
    n = len(run.model.layers)
    forward = [(p, i) for p, i in calls if p == "forward"]
    recomputed = [(p, i) for p, i in calls if p == "backward"]
    assert len(forward) == 2 * n * 2  # 2 micro-batches x (attention + FFN) per block
    if ac:  # each block ran once more inside backward, in reverse order
        assert len(recomputed) == len(forward)
        assert [i for _, i in recomputed][::2] == list(range(n - 1, -1, -1)) * 2
    else:
        assert recomputed == []
    # the same step either way
    ref_run, ref_state = _run(shared, tmp_path / "ref", "grad_accum=2")
    ref = train_step(ref_run, ref_state)
    assert stats.loss == pytest.approx(ref.loss, abs=1e-6)
    assert stats.grad_norm == pytest.approx(ref.grad_norm, rel=1e-5)


@pytest.mark.parametrize("compiled", [True, False], ids=["compile", "eager"])
def test_compile_runs_the_compiled_blocks(tmp_path, shared, compiled):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run, state = _run(shared, tmp_path / "c", f"compile={str(compiled).lower()}", "model.n_layers=2")
    inside = []
    for block in run.model.layers:
        # Dynamo traces this hook into the block's graph and replays its side effect each time
        # the compiled code runs, with the value it had while tracing: True only when compiled.
        block.attention.register_forward_hook(lambda *_: inside.append(torch.compiler.is_compiling()))
    try:
        train_step(run, state)
        graphs = counters["stats"]["unique_graphs"]
        inside.clear()
        train_step(run, state)  # a second step reuses the compiled code without tracing again
        assert inside == [compiled] * len(run.model.layers)
        assert counters["stats"]["unique_graphs"] == graphs
        if compiled:
            assert graphs >= len(run.model.layers) and counters["frames"]["ok"] >= len(run.model.layers)
        else:
            assert graphs == 0
    finally:
        torch._dynamo.reset()
