"""Does iRoPE deliver? Length generalisation and retrieval on our own models, against controls.

The design and its pre-registered pass criteria are ``shared/LONG_CONTEXT.md`` §7: five attention
layouts of one size (``spec.VARIANTS``) are trained on the same data, steps, LR and seeds at
length L, then probed far beyond L with the evaluation room's own probes (``llama4 eval longppl``:
Δ(k) at k·L; ``llama4 eval needle``: passkey retrieval at lengths × depths). The pieces:

    spec.py       the study's sizes (full and ``--quick``) and the variants' ModelArgs
    passkey.py    the training batches: corpus windows + passkey prompts in the needle probe's format
    training.py   the shared tokenizer/data and one variant's training run
    probes.py     the two probes, inference-time temperature tuning, memory and speed at length
    verdict.py    the §7 criteria -> ``DIR/verdict.json``
    plots.py      per-position loss, Δ(k), passkey heatmaps per variant
    study.py      the whole study, resumable: ``run_study(out, spec, seeds)``
"""
