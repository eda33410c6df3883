"""The quantized checkpoint: a Hugging Face folder whose config.json carries a
``quantization_config`` and whose safetensors hold the stored forms.

config.json ``quantization_config`` (format_version 1)::

    {"quant_method": "llama4_weight_only", "format_version": 1,
     "scheme": "bf16" | "fp16" | "int8" | "int4",
     "group_size": 32 | 64 | 128 (int4) or null,
     "formula": "<how a weight is rebuilt, in words>",
     "quantized_tensors": ["model.layers.0.self_attn.q_proj.weight", ...]}   # HF names

For every name W in ``quantized_tensors`` the safetensors hold, under the HF names:

    W         bf16/fp16: the weight cast;  int8: int8 q;  int4: uint8, two q per byte (low nibble
              first) along the last axis
    W_scale   float32, int8 and int4: the weight's shape with the reduction (input) axis removed
              (int8) or divided by group_size (int4)
    W_zero    float32, int4 only: same shape as W_scale; w = (q - 8) * scale + zero

The reduction axis is the last one for Linear weights (out, in) and axis -2 for the fused expert
stacks ``experts.gate_up_proj`` (E, D, 2F) and ``experts.down_proj`` (E, F, D). Every other tensor
is the float model's. See llama4/quant/formats.py for the arithmetic.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch

from llama4.quant.formats import FLOAT16, GROUP_SIZES, SCHEMES, parts, quantize

QUANT_METHOD = "llama4_weight_only"
FORMAT_VERSION = 1
FORMULAS = {
    "bf16": "w = weight (bfloat16)", "fp16": "w = weight (float16)",
    "int8": "w = weight * weight_scale (per output channel, symmetric)",
    "int4": "w = (q - 8) * scale + zero, q = 4-bit (two per uint8, low nibble first, along the last "
            "axis), scale/zero per group of group_size inputs",
}
# files copied from the float model's folder when present
_SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def part_name(hf_name: str, part: str) -> str:
    return hf_name if part == "q" else f"{hf_name}_{part}"


def _is_expert(our_key: str) -> bool:
    return ".experts." in our_key


def quantization_config(scheme: str, group_size: int | None, names: list[str]) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "scheme": scheme,
            "group_size": group_size if scheme == "int4" else None, "formula": FORMULAS[scheme],
            "quantized_tensors": names}


def parse_quantization_config(qc, source: str) -> tuple[str, int | None, list[str]]:
    """-> (scheme, group_size, quantized HF names); a clear error for anything else."""
    from llama4.checkpoint.common import CheckpointConfigError

    if not isinstance(qc, Mapping):
        raise CheckpointConfigError(f"{source}: field 'quantization_config' must be an object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointConfigError(f"{source}: field 'quantization_config' is set with quant_method "
                                    f"{qc.get('quant_method')!r}, which is not supported (this loader reads "
                                    f"{QUANT_METHOD!r}, as `llama4 quantize` writes it)")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointConfigError(f"{source}: quantization_config.format_version = "
                                    f"{qc.get('format_version')!r}; this loader reads {FORMAT_VERSION}")
    scheme = qc.get("scheme")
    if scheme not in SCHEMES:
        raise CheckpointConfigError(f"{source}: quantization_config.scheme = {scheme!r}; expected one of {SCHEMES}")
    g = qc.get("group_size")
    if scheme == "int4" and g not in GROUP_SIZES:
        raise CheckpointConfigError(f"{source}: quantization_config.group_size = {g!r}; int4 needs one of "
                                    f"{GROUP_SIZES}")
    names = qc.get("quantized_tensors")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointConfigError(f"{source}: quantization_config.quantized_tensors must be a list of "
                                    "tensor names")
    return scheme, (g if scheme == "int4" else None), names


# --------------------------------------------------------------------------------------------
# write

def quantize_dir(model_dir, out, scheme: str, group_size: int | None = None, head: bool = True) -> Path:
    """Read the float model in ``model_dir``, write its quantized checkpoint to ``out`` (a new
    folder, renamed into place when complete). Tokenizer and generation files are copied."""
    from safetensors.torch import save_file

    from llama4.checkpoint import hf
    from llama4.checkpoint.common import CheckpointError, unwrap_model
    from llama4.checkpoint.fold import fold_forward_multipliers
    from llama4.checkpoint.store import load
    from llama4.infer.model_dir import resolve_model_dir
    from llama4.model import MultimodalTransformer
    from llama4.quant.apply import target_keys

    if scheme not in SCHEMES:
        raise ValueError(f"--scheme {scheme!r}: use one of {SCHEMES}")
    if scheme == "int4":
        if group_size is None:
            group_size = 32
        if group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size {group_size}: int4 supports {GROUP_SIZES}")
    elif group_size is not None:
        raise ValueError(f"--group-size is for int4 only (scheme {scheme!r} has no groups)")
    src = resolve_model_dir(model_dir)
    out = Path(out)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file}: not a readable JSON file ({e})") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if qc:
        was = qc.get("scheme", "?") if isinstance(qc, Mapping) else "?"
        raise ValueError(f"{cfg_file}: this model is already quantized (scheme {was!r}); quantize the float "
                         "model it came from instead")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty directory; refusing to overwrite it")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out}: is the input model's own folder")

    model = unwrap_model(load(src))
    if isinstance(model, MultimodalTransformer):
        raise ValueError(f"{src}: a multimodal checkpoint; quantization covers text-only models for now")
    targets = target_keys(model, head=head)
    args, state = fold_forward_multipliers(model.args, model.state_dict())
    float_dtype = state["tok_embeddings.weight"].dtype

    tensors, names = {}, []
    for g in hf.plan(state.keys(), args.n_layers):
        quantized = [k in targets for k in g.ours]
        if any(quantized) and not all(quantized):  # cannot happen with our target list
            raise CheckpointError(f"internal error: {g.hf} mixes quantized and float weights")
        for name, t in zip(g.hf, g.rule.to_hf([state[k] for k in g.ours])):
            if not quantized[0]:
                tensors[name] = t.detach().contiguous()
                continue
            axis = -2 if _is_expert(g.ours[0]) else -1
            stored = quantize(t.detach(), scheme, group_size, axis, what=f"tensor {name!r} of {src}")
            for part, v in stored.items():
                tensors[part_name(name, part)] = v.contiguous()
            names.append(name)
    hf_cfg = hf.hf_config_from_args(args, float_dtype)
    hf_cfg["quantization_config"] = quantization_config(scheme, group_size, names)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "quantization": scheme})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for f in _SIDE_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
        if out.exists():  # an empty directory (checked above)
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# read

def load_quantized(path: Path, cfg: dict, dtype=None, device=None, path_choice: str = "auto"):
    """The model of a quantized folder (called by llama4.checkpoint.store.load_hf when config.json
    has a ``quantization_config``): quantized modules swapped in, compute paths chosen."""
    from llama4.checkpoint import hf
    from llama4.checkpoint.common import CheckpointError, build_on_meta, describe, materialize, resolve_dtype
    from llama4.checkpoint.store import SafetensorsSet
    from llama4.quant.apply import module_of, prepare, quantize_modules

    cfg_file = path / "config.json"
    scheme, group_size, qnames = parse_quantization_config(cfg["quantization_config"], str(cfg_file))
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    text = hf.args_from_hf_config(plain, str(cfg_file))
    if plain.get("model_type") != hf.TEXT_MODEL_TYPE:
        raise CheckpointError(f"{cfg_file}: quantized checkpoints are text-only ({hf.TEXT_MODEL_TYPE!r})")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None and text.dtype not in (None, "auto"):
        dtype = resolve_dtype(text.dtype, str(cfg_file))
    model = build_on_meta(text.args)
    groups = hf.plan(model.state_dict().keys(), text.args.n_layers)
    expected = hf.hf_shapes(model.state_dict(), text.args.n_layers)
    qset = set(qnames)
    unknown = qset - set(expected)
    if unknown:
        raise CheckpointError(f"{cfg_file}: quantization_config.quantized_tensors names tensor(s) this model "
                              f"does not have: {describe(unknown)}")
    modules = []
    for g in groups:
        flags = [n in qset for n in g.hf]
        if any(flags):
            if not all(flags):
                raise CheckpointError(f"{cfg_file}: {g.hf} must be quantized together")
            for k in g.ours:
                if module_of(k) not in modules:
                    modules.append(module_of(k))
    quantize_modules(model, modules, scheme, group_size)
    for name in modules:  # an expert module needs all three stacks quantized
        if name.endswith(".experts"):
            need = [h for g in groups if any(module_of(k) == name for k in g.ours) for h in g.hf]
            if not all(h in qset for h in need):
                raise CheckpointError(f"{cfg_file}: the routed experts {name} must all be quantized "
                                      f"({describe(need)})")

    files = SafetensorsSet(path)
    try:
        src = str(files.source)
        wanted = {}
        for g in groups:
            for n in g.hf:
                ps = parts(scheme) if n in qset else ("q",)
                for p in ps:
                    wanted[part_name(n, p)] = (n, p)
        missing = [k for k in wanted if k not in files.where]
        if missing:
            scales = [k for k in missing if wanted[k][1] != "q"]
            what = (f"missing scale/zero tensor(s) of quantized weights ({scheme}): {describe(scales)}"
                    if scales else f"missing tensor(s): {describe(missing)}")
            raise CheckpointError(f"{src}: {what}")
        extra = [k for k in files.where if k not in wanted]
        if extra:
            raise CheckpointError(f"{files.where[extra[0]]}: unexpected tensor(s): {describe(extra)}")

        def read(name, part):
            t = files.get(part_name(name, part))
            t = t.to(device)
            if name not in qset:
                if not t.is_floating_point():
                    raise CheckpointError(f"{files.where[name]}: tensor {name!r} has dtype {t.dtype}")
                return t.to(dtype or t.dtype)
            return t

        state, origin = {}, {}  # origin: our key -> the HF tensor(s) it came from (for errors)
        for g in groups:
            if g.hf[0] not in qset:
                for k, t in zip(g.ours, g.rule.to_ours([read(n, "q") for n in g.hf])):
                    state[k] = t
                continue
            for p in parts(scheme):
                for k, t in zip(g.ours, g.rule.to_ours([read(n, p) for n in g.hf])):
                    key = f"{k}_{p}" if _is_expert(k) else (k if p == "q" else f"{k}_{p}")
                    state[key] = t
                    origin[key] = ", ".join(part_name(n, p) for n in g.hf)
        _check_stored_dtypes(state, origin, model, src)
        model = materialize(model, state, device, src)
    finally:
        files.close()
    prepare(model, path_choice)
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model


def _check_stored_dtypes(state: dict, origin: dict, model, src: str) -> None:
    """The stored forms must have the dtype their scheme defines (a float where int8 belongs is
    a checkpoint that was not written by `llama4 quantize`, or was edited)."""
    from llama4.checkpoint.common import CheckpointError

    own = model.state_dict()
    for k, want in ((k, own[k].dtype) for k in origin if k in own):
        t = state[k]
        if (not want.is_floating_point or want in FLOAT16.values()) and t.dtype != want:
            raise CheckpointError(f"{src}: tensor {origin[k]!r} has dtype {t.dtype}; the quantization config's "
                                  f"scheme stores it as {want}")
