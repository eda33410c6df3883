"""Packing and the resumable loader: exact windows, document boundaries, determinism, resume."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from llama4.data import PackedLoader, TokenStream, val_batches


def _stream_tokens(data_dir) -> np.ndarray:
    s = TokenStream(data_dir)
    return s.read(0, s.n_tokens)


def test_batch_is_a_window_of_the_stream(prepared, tok):
    all_ids = _stream_tokens(prepared)
    loader = PackedLoader(prepared, batch_size=4, seq_len=64, seed=3)
    b = loader.next_batch()
    assert b.inputs.shape == b.targets.shape == b.doc_ids.shape == (4, 64)
    assert b.inputs.dtype == torch.int64
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    for row in b.inputs:
        hits = [s for s in range(0, len(all_ids) - 64, 64) if np.array_equal(all_ids[s : s + 64], row)]
        assert hits  # every row is an aligned window of the packed stream


def test_document_boundaries(prepared, tok):
    loader = PackedLoader(prepared, batch_size=8, seq_len=128, seed=0)
    for _ in range(10):
        b = loader.next_batch()
        is_bos = b.inputs == tok.bos_id
        # A new document starts exactly at each BOS (and positions restart there).
        assert torch.equal(b.positions == 0, is_bos)
        expect = torch.cumsum(is_bos.int(), 1) - is_bos[:, :1].int()
        assert torch.equal(b.doc_ids, expect.int())
        mask = b.document_mask()
        assert mask.shape == (8, 128, 128) and not mask.triu(1).any()
        i, j = torch.where(~mask[0].tril() & torch.ones(128, 128, dtype=torch.bool).tril())
        assert torch.all(b.doc_ids[0, i] != b.doc_ids[0, j])


def test_deterministic_and_seeded(prepared):
    a = PackedLoader(prepared, 4, 32, seed=1)
    b = PackedLoader(prepared, 4, 32, seed=1)
    c = PackedLoader(prepared, 4, 32, seed=2)
    xa = [a.next_batch().inputs for _ in range(5)]
    xb = [b.next_batch().inputs for _ in range(5)]
    xc = [c.next_batch().inputs for _ in range(5)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


def test_epoch_visits_every_window_once(prepared):
    loader = PackedLoader(prepared, 4, 256, seed=0)
    stream = _stream_tokens(prepared)
    seen = []
    for _ in range(loader.steps_per_epoch):
        for row in loader.next_batch().inputs:
            seen.append(bytes(row.numpy().astype(np.int64)))
    assert len(set(seen)) == len(seen) == loader.steps_per_epoch * 4
    assert loader.n_windows == (len(stream) - 1) // 256
    loader.next_batch()
    assert loader.state_dict()["epoch"] == 1


def test_resume_is_exact_across_epochs(prepared):
    ref = PackedLoader(prepared, 4, 256, seed=5)
    n = ref.steps_per_epoch + 3  # cross an epoch boundary
    ref_batches = [ref.next_batch() for _ in range(n)]
    run = PackedLoader(prepared, 4, 256, seed=5)
    for _ in range(n - 5):
        run.next_batch()
    state = run.state_dict()
    assert all(isinstance(v, (int, list)) for v in state.values())  # plain, checkpointable
    resumed = PackedLoader(prepared, 4, 256, seed=5)
    resumed.load_state_dict(state)
    for want in ref_batches[n - 5 :]:
        got = resumed.next_batch()
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.doc_ids, want.doc_ids)


def test_state_mismatch_is_refused(prepared):
    state = PackedLoader(prepared, 4, 32, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(prepared, 4, 64, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(prepared, 4, 32, seed=9).load_state_dict(state)


def test_ranks_split_the_global_batch(prepared):
    full = PackedLoader(prepared, 6, 32, seed=4)
    r0 = PackedLoader(prepared, 3, 32, seed=4, rank=0, world_size=2)
    r1 = PackedLoader(prepared, 3, 32, seed=4, rank=1, world_size=2)
    for _ in range(4):
        f = full.next_batch().inputs
        assert torch.equal(torch.cat([r0.next_batch().inputs, r1.next_batch().inputs]), f)


def test_val_batches_cover_split_in_order(tmp_path, tok, mixed_corpus):
    from llama4.data.shards import tokenize_files

    tokenize_files([mixed_corpus[0] / "b.jsonl"], tok, tmp_path, split="val", workers=1, progress=False)
    stream = _stream_tokens_split(tmp_path)
    got = torch.cat([b.inputs.reshape(-1) for b in val_batches(tmp_path, 4, 100)])
    assert torch.equal(got, torch.from_numpy(stream[: len(got)]))
    assert len(got) == (len(stream) - 1) // 100 * 100
    assert [b.inputs.shape for b in val_batches(tmp_path, 4, 100, max_batches=2)] == [(4, 100)] * 2


def _stream_tokens_split(d):
    s = TokenStream(d, "val")
    return s.read(0, s.n_tokens)


def test_loader_is_fast(prepared):
    loader = PackedLoader(prepared, 8, 512, seed=0)
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(50):
        loader.next_batch()
    per_step = (time.perf_counter() - t0) / 50
    assert per_step < 0.005, f"{per_step * 1e3:.2f} ms per batch of 8x512"
