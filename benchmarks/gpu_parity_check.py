"""CUDA fp32 vs CPU fp32 on identical weights, split into dense and MoE models, to tell numerical
noise from discrete routing flips (a near-tie in a top-1 router can pick another expert)."""

import torch

from llama4.model import ModelArgs, Transformer

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def check(name, **kw):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=32768, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64,
                     expert_dim=1024, dense_dim=4096, nope_layer_interval=4, attention_chunk_size=512,
                     floor_scale=1024.0, **kw)
    m = Transformer(args)
    m.init_weights(std=0.05)
    for mod in m.modules():
        if hasattr(mod, "record_router_stats"):
            mod.record_router_stats = True
    tok = torch.randint(0, args.vocab_size, (2, 1300))
    with torch.no_grad():
        cpu = m(tok)
        ids_cpu = [mod.router_logits.argmax(-1) for mod in m.modules() if getattr(mod, "router_logits", None) is not None]
        gpu = m.cuda()(tok.cuda()).cpu()
        ids_gpu = [mod.router_logits.argmax(-1).cpu() for mod in m.modules() if getattr(mod, "router_logits", None) is not None]
    d = (cpu - gpu).abs().amax(-1).flatten()
    flips = sum(int((a != b).sum()) for a, b in zip(ids_cpu, ids_gpu))
    print(f"{name}: max {d.max():.2e}  median-token max {d.median():.2e}  tokens >1e-3: "
          f"{int((d > 1e-3).sum())}/{d.numel()}  routing flips: {flips}", flush=True)


check("dense", n_experts=0)
check("moe top-1", n_experts=16, top_k=1)
