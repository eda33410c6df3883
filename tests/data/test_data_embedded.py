"""`llama4 data prepare` on the embedded corpus: per-language train/val shards, ready to load."""

from __future__ import annotations

from llama4.cli import main as cli_main
from llama4.data import PackedLoader, read_manifest, val_batches, val_languages
from llama4.data.corpus import MAIN_LANGUAGES


def test_prepare_embedded_corpus(tmp_path, capsys, tok):
    out = tmp_path / "data"
    assert cli_main(["data", "prepare", "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 15 shards" in printed and "val: 15 shards" in printed
    m = read_manifest(out)
    train = sum(s["n_tokens"] for s in m["shards"] if s["split"] == "train")
    val = sum(s["n_tokens"] for s in m["shards"] if s["split"] == "val")
    assert train > 4_000_000 and 0.03 < val / (train + val) < 0.1
    assert val_languages(out) == list(MAIN_LANGUAGES) + ["other"]
    for lang in val_languages(out):
        b = next(val_batches(out, 2, 128, lang=lang))
        assert b.inputs.shape == (2, 128)
    loader = PackedLoader(out, 8, 512, seed=0)
    assert loader.steps_per_epoch > 1000
    assert loader.next_batch().inputs.max() < tok.n_words
