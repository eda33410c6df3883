"""What the HF and Meta adapters share: the error type, building on the meta device, and the
final step that hands loaded tensors to the model without a second copy."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from llama4.model import ConfigError, ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written as asked; the message names the file, the
    tensor or the config field at fault."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """An invalid or unsupported config.json / params.json field (also a ``ConfigError``)."""


def describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def build_on_meta(args: ModelArgs) -> Transformer:
    """The model's skeleton: every parameter on the meta device, nothing allocated."""
    with torch.device("meta"):
        return Transformer(args)


def resolve_dtype(value, source: str) -> torch.dtype | None:
    """torch.dtype from a dtype, a name ("bfloat16", "torch.float32") or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise CheckpointError(f"{source}: unsupported dtype {value!r}")
    return dt


def check_keys(expected: Mapping[str, tuple], found: Iterable[str], source: str) -> None:
    """Missing or extra tensors are an error, never a partial load."""
    found = set(found)
    missing = set(expected) - found
    extra = found - set(expected)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {describe(missing)}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s): {describe(extra)}")


def check_shape(name: str, shape, expected, source: str) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(shape)}, "
                              f"expected {tuple(expected)} for this config")


def materialize(model: Transformer, state: dict[str, torch.Tensor], device, source: str) -> Transformer:
    """Hand ``state`` (our names) to a meta-device ``model`` by reference (``assign=True``), then
    rebuild the non-persistent buffers (RoPE frequencies) on ``device``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, state, source)
    for k, v in state.items():
        check_shape(k, v.shape, expected[k], source)
    model.load_state_dict(state, strict=True, assign=True)
    device = torch.device(device) if device is not None else next(iter(state.values())).device
    rebuild_buffers(model, device, source)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after a strict load; kept as the last guard against a partial model
        raise CheckpointError(f"{source}: tensors left unloaded: {describe(left)}")
    return model.eval()


# Non-persistent buffers are not in checkpoints; after a meta-device build they are rebuilt here.
# A buffer-only module with ``reset_parameters`` (RoPE frequencies) recomputes itself; the others
# are listed with their initial value. An unknown one is an error, so a model change cannot slip
# an uninitialised buffer into a loaded model.
ZERO_INIT_BUFFERS = {"expert_bias"}  # MoE's selection bias (inert at zero)


def rebuild_buffers(model: torch.nn.Module, device, source: str) -> None:
    for name, module in model.named_modules():
        meta_bufs = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta_bufs:
            continue
        has_params = any(True for _ in module.parameters(recurse=False))
        if hasattr(module, "reset_buffers"):
            for n in meta_bufs:
                b = module._buffers[n]
                module._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device=device)
            module.reset_buffers()
        elif not has_params and hasattr(module, "reset_parameters"):
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
        elif all(n in ZERO_INIT_BUFFERS for n in meta_bufs):
            for n in meta_bufs:
                b = module._buffers[n]
                module._buffers[n] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        else:
            raise CheckpointError(f"{source}: cannot rebuild buffer(s) {meta_bufs} of module {name!r}")


def wrap_config_error(e: ConfigError, source: str, names: Mapping[str, str]) -> CheckpointConfigError:
    """Re-raise a ModelArgs validation error with the checkpoint's own field names added."""
    msg = str(e)
    fields = []
    for word in re.findall(r"[A-Za-z_]+", msg):
        if word in names and names[word] not in fields:
            fields.append(names[word])
    if fields:
        msg += f" [{source} field{'s' if len(fields) > 1 else ''} {', '.join(map(repr, fields))}]"
    return CheckpointConfigError(f"{source}: inconsistent config: {msg}")


def unwrap_model(model) -> Transformer:
    """Our Transformer behind torch.compile / DDP wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and not isinstance(model, Transformer):
            model = getattr(model, attr)
    if not isinstance(model, Transformer):
        raise CheckpointError(f"can only save a llama4.model.Transformer, got {type(model).__name__}")
    return model


def as_path(path) -> Path:
    return Path(path).expanduser()
