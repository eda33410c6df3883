"""What the HF and Meta adapters share: the error type, building on the meta device, and the
final step that hands loaded tensors to the model without a second copy."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from llama4.model import ConfigError, ModelArgs, MultimodalTransformer, Transformer, VisionArgs


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written as asked; the message names the file, the
    tensor or the config field at fault."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """An invalid or unsupported config.json / params.json field (also a ``ConfigError``)."""


def describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def build_on_meta(args: ModelArgs, vision: VisionArgs | None = None,
                  image_token_id: int | None = None) -> Transformer | MultimodalTransformer:
    """The model's skeleton: every parameter on the meta device, nothing allocated. With
    ``vision`` the early-fusion model (text decoder + vision tower + projector)."""
    with torch.device("meta"):
        if vision is None:
            return Transformer(args)
        return MultimodalTransformer(args, vision, image_token_id)


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


def materialize(model: torch.nn.Module, state: dict[str, torch.Tensor], device, source: str):
    """Hand ``state`` (our names) to a meta-device ``model`` by reference (``assign=True``), then
    rebuild the non-persistent buffers (RoPE tables) on ``device``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, state, source)
    for k, v in state.items():
        check_shape(k, v.shape, expected[k], source)
    model.load_state_dict(state, strict=True, assign=True)
    device = torch.device(device) if device is not None else next(iter(state.values())).device
    model.init_buffers(device)  # RoPE frequencies, MoE selection bias: in no checkpoint
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after a strict load; kept as the last guard against a partial model
        raise CheckpointError(f"{source}: tensors left unloaded: {describe(left)}")
    return model.eval()


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


def unwrap_model(model) -> Transformer | MultimodalTransformer:
    """Our Transformer (or MultimodalTransformer) behind torch.compile / DDP wrappers."""
    ours = (Transformer, MultimodalTransformer)
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and not isinstance(model, ours):
            model = getattr(model, attr)
    if not isinstance(model, ours):
        raise CheckpointError(f"can only save a llama4.model.Transformer or MultimodalTransformer, "
                              f"got {type(model).__name__}")
    return model


def as_path(path) -> Path:
    return Path(path).expanduser()
