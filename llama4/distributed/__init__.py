"""Scale-out on torch.distributed, applied to the pure model from outside.

    mesh.py            ParallelConfig (dp / dp_replicate / ep / tp, mixed precision) -> ParallelDims (meshes)
    parallelize.py     tensor parallel plans, expert parallel, activation checkpointing, FSDP2
    expert_parallel.py the experts behind all-to-all dispatch/combine
    checkpoint.py      DCP sharded save/resume (model, optimizer, loader, RNG); DCP <-> HF layout
    plan.py            the memory planner behind `llama4 plan`
    cli.py             `llama4 plan`, `llama4 dcp to-hf|from-hf`

Imports are lazy so that `llama4 --help` does not pay for torch.distributed.
"""

_EXPORTS = {"ParallelConfig": "mesh", "ParallelDims": "mesh", "init_parallel": "mesh", "destroy_parallel": "mesh",
            "pick_device": "mesh", "parallelize": "parallelize", "materialize": "parallelize",
            "clip_grad_norm_": "parallelize"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"llama4.distributed.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llama4.distributed' has no attribute {name!r}")
