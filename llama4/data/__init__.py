"""Data room: the embedded multilingual corpus, tokenized shards, packing and loaders.

    from llama4.data import prepare_embedded_corpus, PackedLoader, val_batches
    prepare_embedded_corpus(tokenizer, "runs/data")          # uint32 shards + manifest.json
    loader = PackedLoader("runs/data", batch_size=8, seq_len=512, seed=0)
    batch = loader.next_batch()                               # inputs/targets/doc_ids/positions
    state = loader.state_dict()                               # plain dict, for checkpoints

Names are imported lazily: tokenizer worker processes import ``llama4.data.shards`` and must
not pay for importing torch (which only the loader needs).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "llama4.data.packing",
    "TokenStream": "llama4.data.packing",
    "PackedLoader": "llama4.data.loader",
    "val_batches": "llama4.data.loader",
    "val_languages": "llama4.data.loader",
    "CorpusError": "llama4.data.readers",
    "Document": "llama4.data.readers",
    "iter_documents": "llama4.data.readers",
    "iter_texts": "llama4.data.readers",
    "prepare_embedded_corpus": "llama4.data.shards",
    "read_manifest": "llama4.data.shards",
    "tokenize_files": "llama4.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama4.data' has no attribute {name!r}")
