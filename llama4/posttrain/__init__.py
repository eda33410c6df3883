"""Post-training: turn a pretrained base model into an assistant.

Llama 4's recipe (Meta, April 2025): lightweight SFT -> online RL with verifiable rewards ->
lightweight DPO. Each stage is a training run built around ``llama4.train``'s loop
(``train_step`` with the stage's own ``batch_fn`` / ``loss_fn``, the same checkpoints, bit-identical
``--resume``, ``metrics.jsonl``, plots and ``OUT/final`` export); :mod:`llama4.posttrain.stage`
builds that run from an existing model directory instead of from scratch.

    stage.py      build_stage_run / run_stage: a Run from a base model dir, its loop and final export
    chat_data.py  TRL conversational JSONL -> token ids + assistant-only labels; padded batches
    sft.py        supervised fine-tuning (``llama4 sft``)

No heavy imports here: ``llama4 --help`` must stay fast.
"""
