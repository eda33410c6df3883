"""Weight-only quantization (bf16/fp16, int8 per channel, int4 group-wise), applied to the pure
model from outside: formats.py (arithmetic), kernels.py (compute paths, measured choice),
fused.py (compiled decode: dequantizing reductions over the compact weights),
layers.py (QuantLinear, QuantExperts), apply.py (which weights, module swap, path choice),
checkpoint.py (the file format: `llama4 quantize` writes it, `llama4.load` reads it), cli.py.

Nothing here is imported eagerly: ``llama4 --help`` must not pay for torch."""
