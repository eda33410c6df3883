"""LoRA: low-rank adapters put on a pure `Transformer` from outside, base weights frozen.

Each adapted weight W becomes ``W + (alpha / r) * delta`` with a rank-r ``delta``:

* ``nn.Linear`` (attention wq/wk/wv/wo, shared-expert and dense FFN w1/w2/w3), weight (out, in):
  ``delta = lora_B @ lora_A`` with ``lora_A`` (r, in) and ``lora_B`` (out, r) -- PEFT's shapes, so
  ``y = x W^T + (alpha/r) * (x A^T) B^T``.
* routed experts (`GroupedExperts` w1/w3 (E, D, F), w2 (E, F, D), ``x @ W`` layout): one adapter
  per expert, ``delta[e] = lora_A[e] @ lora_B[e]`` with ``lora_A`` (E, D, r), ``lora_B`` (E, r, F).

``lora_A`` starts uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform bound), ``lora_B`` at zero,
so a fresh adapter adds exactly ``W + 0`` and leaves the logits bit-for-bit unchanged.

Scaling: ``alpha / r`` (PEFT's and the LoRA paper's convention). It keeps the size of the update
roughly independent of r, so a learning rate tuned at one rank carries over to another; with
``alpha == r`` the scale is 1.

Mechanism: a ``torch.nn.utils.parametrize`` parametrization on the weight tensor, not a wrapper
module or a forward hook, because

* the model keeps calling its own code: `GroupedExperts.forward` still runs one ``grouped_mm``
  per projection on the (adapted) stacked weight, and the ``loop`` / ``gather`` paths of `MoE`
  that index ``experts.w1[e]`` directly see the adapter too -- an activation-side adapter would
  have to re-implement all three routed paths outside the model;
* the merged weight is by construction the very tensor the unmerged forward used, so
  `merge_lora` is exact, and `merge_lora` is just ``remove_parametrizations(leave_parametrized=True)``;
* torch.compile traces parametrizations as ordinary tensor code (one ``bmm`` / ``mm`` and an
  add per adapted weight, no Python-side state or graph breaks).

The price: each forward materialises ``W + delta`` for every adapted weight (one weight-sized
temporary, kept for backward), and input-side dropout cannot be expressed on a weight, so
``dropout`` must be 0 (a clear error otherwise). The memory saving that remains -- no gradients
or AdamW moments for the frozen base -- is measured in benchmarks/bench_lora_memory.py.

Generation with unmerged adapters (RL sampling) should run inside ``adapters_cached()`` so each
adapted weight is computed once per call rather than once per decoded token.

Apply LoRA before ``torch.compile`` / FSDP wrapping; save the merged model with
``merge_lora(model)`` then ``llama4.save``, or the adapter alone with `save_adapter`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from llama4.model.attention import Attention
from llama4.model.layers import FeedForward
from llama4.model.moe import MoE, GroupedExperts

TARGETS = ("attention", "experts", "shared", "dense")
DEFAULT_TARGETS = ("attention", "experts", "shared")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRADelta(nn.Module):
    """Parametrization ``W -> W + scale * delta`` (see the module docstring for the layouts)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.stacked = weight.dim() == 3
        kw = dict(dtype=weight.dtype, device=weight.device)
        if self.stacked:  # (E, D_in, D_out), x @ W[e]
            n, d_in, d_out = weight.shape
            self.lora_A = nn.Parameter(torch.empty(n, d_in, rank, **kw))
            self.lora_B = nn.Parameter(torch.zeros(n, rank, d_out, **kw))
        else:  # nn.Linear (D_out, D_in), x @ W^T
            d_out, d_in = weight.shape
            self.lora_A = nn.Parameter(torch.empty(rank, d_in, **kw))
            self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **kw))
        bound = 1.0 / math.sqrt(d_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)

    def delta(self) -> torch.Tensor:
        """The low-rank update in the weight's own layout, unscaled."""
        return torch.bmm(self.lora_A, self.lora_B) if self.stacked else self.lora_B @ self.lora_A

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * self.delta()).to(weight.dtype)


def _targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    targets = tuple(t.strip() for t in targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets: unknown {unknown or 'empty list'}; choose from {', '.join(TARGETS)}")
    return targets


def _target_weights(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(module path, module, parameter name) of every weight the targets name."""
    found = []
    shared = {id(m.shared_expert) for m in model.modules() if isinstance(m, MoE)}
    for path, mod in model.named_modules():
        if isinstance(mod, Attention) and "attention" in targets:
            found += [(f"{path}.{n}", getattr(mod, n), "weight") for n in ("wq", "wk", "wv", "wo")]
        elif isinstance(mod, GroupedExperts) and "experts" in targets:
            found += [(path, mod, n) for n in ("w1", "w2", "w3")]
        elif isinstance(mod, FeedForward) and ("shared" if id(mod) in shared else "dense") in targets:
            found += [(f"{path}.{n}", getattr(mod, n), "weight") for n in ("w1", "w2", "w3")]
    return found


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, LoRADelta]]:
    """(module path, module, parameter name, adapter) of every adapted weight, in model order."""
    out = []
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for pname, plist in mod.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRADelta):
                        out.append((path, mod, pname, p))
    return out


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
               dropout: float = 0.0) -> nn.Module:
    """Freeze every parameter of ``model`` and add trainable rank-``rank`` adapters to the weights
    of ``targets`` (any of ``attention``, ``experts`` (per routed expert), ``shared`` (the MoE
    shared expert), ``dense`` (the FFN of non-MoE layers)); ``alpha`` defaults to ``rank``
    (scale 1). In place; returns ``model``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if dropout != 0.0:
        raise ValueError(f"LoRA dropout={dropout}: these adapters live on the weights (see llama4.posttrain.lora), "
                         f"where input dropout cannot be expressed; use 0")
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora or a fresh model first)")
    targets = _targets(targets)
    found = _target_weights(model, targets)
    if not found:
        raise ValueError(f"apply_lora: the model has no weights for targets {', '.join(targets)}")
    # Remembered so merge_lora gives back a model that trains like the one given.
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model._lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, mod, pname in found:
        w = getattr(mod, pname)
        smallest = min(w.shape[-2:])
        if rank > smallest:
            raise ValueError(f"LoRA rank {rank} exceeds the smallest side ({smallest}) of a targeted weight {tuple(w.shape)}")
        parametrize.register_parametrization(mod, pname, LoRADelta(w, rank, alpha))
    return model


def adapters_cached():
    """Context manager: inside it each adapted weight ``W + delta`` is computed once and reused
    (``torch.nn.utils.parametrize.cached``) -- for inference with unmerged adapters."""
    return parametrize.cached()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update (after `apply_lora`: the adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += alpha/r * delta``) and remove the adapters;
    the model is then a plain `Transformer` again (``llama4.save`` writes it). In place."""
    found = lora_modules(model)
    if not found:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for _, mod, pname, _ in found:
        parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
    flags = getattr(model, "_lora_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    for attr in ("_lora_requires_grad", "_lora_config", "_lora_adapter_only"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def lora_config(model: nn.Module) -> dict:
    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    return dict(model._lora_config)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, named ``<module>.<weight>.lora_A`` / ``.lora_B`` (e.g.
    ``layers.1.feed_forward.experts.w1.lora_A``, ``layers.0.attention.wq.weight.lora_B``)."""
    out = {}
    for path, _, pname, d in lora_modules(model):
        out[f"{path}.{pname}.lora_A"] = d.lora_A.detach()
        out[f"{path}.{pname}.lora_B"] = d.lora_B.detach()
    if not out:
        raise ValueError("lora_state_dict: the model has no LoRA adapters (apply_lora first)")
    return out


def load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (as `lora_state_dict` names them) into the model's adapters; the set
    of names and every shape must match exactly."""
    mine = lora_state_dict(model)
    missing, unexpected = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
    if missing or unexpected:
        raise ValueError(f"load_lora: adapter names differ: missing {missing[:4]} ({len(missing)}), "
                         f"unexpected {unexpected[:4]} ({len(unexpected)})")
    for k, t in mine.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise ValueError(f"load_lora: {k} has shape {tuple(state[k].shape)}, the model's adapter {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in mine.items():
            t.copy_(state[k])


def save_adapter(model: nn.Module, path, extra_files: dict[str, bytes] | None = None, **extra_config) -> Path:
    """Write the adapter alone: ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's
    fields ``peft_type``, ``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``bias``,
    plus ``extra_config``), and ``extra_files`` (name -> bytes, e.g. the tokenizer). The directory
    appears complete or not at all."""
    from safetensors.torch import save_file

    from llama4.checkpoint.store import _swap_into_place

    path = Path(path).expanduser()
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    cfg = {"peft_type": "LORA", **lora_config(model), "lora_dropout": 0.0, "bias": "none",
           "format": "llama4", **extra_config}
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"save_adapter: {path} exists and is not a directory")
        own = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, *(extra_files or {}))
        foreign = [p.name for p in path.iterdir() if p.name not in own]
        if foreign:
            raise ValueError(f"save_adapter: {path} holds other files ({', '.join(sorted(foreign)[:4])}); "
                             f"refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def export_stage_model(model: nn.Module, tok_path: Path, out: Path) -> Path:
    """The end of a post-training stage trained with LoRA: ``OUT/final``, the merged model
    (``merge_lora`` then the stage's usual export), or -- when the run asked for the adapter alone
    (``--adapter-only``, recorded by `llama4.posttrain.lora_args.lora_from_args`) --
    ``OUT/adapter`` (`save_adapter`, with the run's tokenizer.model beside it). Returns the folder."""
    from llama4.train.finish import export_final

    if getattr(model, "_lora_adapter_only", False):
        tok_path = Path(tok_path)
        return save_adapter(model, Path(out) / "adapter", extra_files={tok_path.name: tok_path.read_bytes()})
    return export_final(merge_lora(model), tok_path, Path(out))


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Put the adapter saved at ``path`` on ``model`` (applying LoRA with its config if the model
    has no adapters yet) and load its tensors. Returns ``model``."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"load_adapter: {path / name} not found")
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        rank, alpha, targets = int(cfg["r"]), float(cfg["lora_alpha"]), cfg["target_modules"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"load_adapter: {path / ADAPTER_CONFIG}: not a LoRA config ({e})") from None
    if not lora_modules(model):
        apply_lora(model, rank, alpha, targets)
    elif lora_config(model)["r"] != rank or lora_config(model)["lora_alpha"] != alpha:
        raise ValueError(f"load_adapter: {path} has r={rank}, alpha={alpha}; the model's adapters "
                         f"{lora_config(model)}")
    load_lora(model, load_file(str(path / ADAPTER_WEIGHTS)))
    return model
