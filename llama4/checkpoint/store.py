"""Reading and writing checkpoints: `load` (HF or Meta directory) and `save` (HF layout, atomic).

Loading never holds the model twice: the model is built on the meta device, each tensor is read
once (safetensors `safe_open`, or `torch.load(mmap=True, weights_only=True)` for Meta's .pth),
converted, and handed over with ``load_state_dict(assign=True)``. Every name and shape is checked
against the config before any tensor data is read, and anything missing, extra or mis-shaped is
a `CheckpointError` naming the tensor and file, never a partial model.

Saving writes config.json + safetensors (sharded with model.safetensors.index.json when larger
than ``max_shard_size``) into a temporary directory next to the target and renames it into place,
so a reader sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from llama4.checkpoint import hf, hf_vision, meta
from llama4.checkpoint.fold import fold_forward_multipliers
from llama4.checkpoint.common import (CheckpointError, as_path, build_on_meta, check_keys,
                                      check_shape, describe, materialize, resolve_dtype, unwrap_model)
from llama4.model import MultimodalTransformer, Transformer

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
META_PARAMS = "params.json"
_META_SHARD = re.compile(r"^consolidated(?:\.(\d+))?\.pth$")
_SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
# Files `save` writes: an existing directory holding only these may be replaced.
_OWN_FILES = re.compile(r"^(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                        r"model-\d{5}-of-\d{5}\.safetensors|tokenizer\.(json|model)|tokenizer_config\.json|"
                        r"special_tokens_map\.json)$")


# --------------------------------------------------------------------------------------------
# load

def load(path, dtype=None, device=None) -> Transformer | MultimodalTransformer:
    """A Llama 4 model from a Hugging Face directory (config.json + safetensors) or Meta's layout
    (params.json + consolidated.*.pth, text only). A text-only HF checkpoint gives a `Transformer`;
    a multimodal one (``Llama4ForConditionalGeneration``) a `MultimodalTransformer`.

    ``dtype``: the parameter dtype (default: the checkpoint's). ``device``: where the weights go
    (default: cpu)."""
    path = as_path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (does not exist or is a file)")
    dtype = resolve_dtype(dtype, "load(dtype=...)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if (path / HF_CONFIG).is_file():
        return load_hf(path, dtype, device)
    if (path / META_PARAMS).is_file():
        return load_meta(path, dtype, device)
    raise CheckpointError(f"{path}: neither {HF_CONFIG} (Hugging Face) nor {META_PARAMS} (Meta) found")


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read JSON: {e}") from None


class SafetensorsSet:
    """The tensors of one HF checkpoint: a single model.safetensors or the shards an index names.
    Headers are read up front (names, shapes, dtypes); data only on ``get``."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.where: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self.source = root / SAFE_INDEX  # what error messages about the set as a whole name
        if (root / SAFE_INDEX).is_file():
            index = _read_json(root / SAFE_INDEX)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{root / SAFE_INDEX}: no 'weight_map' object of tensor name -> file")
            files = {}
            for name, fname in wm.items():
                f = root / fname
                if Path(fname).name != fname:
                    raise CheckpointError(f"{root / SAFE_INDEX}: shard name {fname!r} is not a plain file name")
                files.setdefault(f, set()).add(name)
            for f, names in files.items():
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard listed in {SAFE_INDEX} is missing")
                have = set(self._open(f).keys())
                missing, extra = names - have, have - names
                if missing:
                    raise CheckpointError(f"{f}: lacks tensor(s) {describe(missing)} that {SAFE_INDEX} places there")
                if extra:
                    raise CheckpointError(f"{f}: holds tensor(s) {describe(extra)} not listed in {SAFE_INDEX}")
                for n in names:
                    self.where[n] = f
        elif (root / SAFE_SINGLE).is_file():
            f = self.source = root / SAFE_SINGLE
            for n in self._open(f).keys():
                self.where[n] = f
        else:
            raise CheckpointError(f"{root}: no {SAFE_SINGLE} or {SAFE_INDEX}")

    def _open(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            try:
                h = self._safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError, OSError: truncated, not safetensors, unreadable
                raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            self._handles[f] = h
        return h

    def shape(self, name: str) -> tuple:
        return tuple(self._open(self.where[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self._open(f).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None

    def close(self):
        self._handles.clear()


def load_hf(path, dtype=None, device=None) -> Transformer | MultimodalTransformer:
    path = as_path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    cfg_file = path / HF_CONFIG
    cfg = _read_json(cfg_file)
    if isinstance(cfg, dict) and cfg.get("quantization_config"):
        from llama4.quant.checkpoint import load_quantized  # weights written by `llama4 quantize`

        return load_quantized(path, cfg, dtype, device)
    text = hf.args_from_hf_config(cfg, str(cfg_file))
    vision = hf_vision.vision_args_from_hf_config(cfg, str(cfg_file))
    files = SafetensorsSet(path)
    try:
        if dtype is None and text.dtype not in (None, "auto"):
            dtype = resolve_dtype(text.dtype, str(cfg_file))
        if vision is None:
            model = build_on_meta(text.args)
            layout = dict(prefix=text.prefix)
            ours_embed = "tok_embeddings.weight"
        else:  # the whole Llama4ForConditionalGeneration: nothing is skipped
            model = build_on_meta(text.args, vision.args, vision.image_token_id)
            layout = dict(n_vision_layers=vision.args.n_layers)
            ours_embed = hf.MM_OURS_TEXT_PREFIX + "tok_embeddings.weight"
        meta_state = model.state_dict()
        groups = hf.plan(meta_state.keys(), text.args.n_layers, **layout)
        expected = hf.hf_shapes(meta_state, text.args.n_layers, **layout)
        lm_head = text.prefix + "lm_head.weight"
        tied = text.tie_word_embeddings and lm_head not in files.where  # read lm_head from the embedding
        src = str(files.source)
        missing = [k for k in expected if k not in files.where and not (tied and k == lm_head)]
        if missing:
            raise CheckpointError(f"{src}: missing tensor(s): {describe(missing)}")
        extra = [k for k in files.where if k not in expected]
        if extra:
            raise CheckpointError(f"{files.where[extra[0]]}: unexpected tensor(s): {describe(extra)}")
        for k, shape in expected.items():
            if not (tied and k == lm_head):
                check_shape(k, files.shape(k), shape, str(files.where[k]))

        def read(name):
            if tied and name == lm_head:
                name = text.prefix + "model.embed_tokens.weight"
            t = files.get(name)
            if not t.is_floating_point():
                raise CheckpointError(f"{files.where[name]}: tensor {name!r} has dtype {t.dtype}")
            return t.to(device=device, dtype=dtype or t.dtype)

        state = {}
        for g in groups:
            for k, t in zip(g.ours, g.rule.to_ours([read(n) for n in g.hf])):
                state[k] = t
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) > 1:  # mixed dtypes on disk and no dtype asked: use the embedding's
            dt = state[ours_embed].dtype
            state = {k: v.to(dt) for k, v in state.items()}
        return materialize(model, state, device, src)
    finally:
        files.close()


def _meta_shards(path: Path) -> list[Path]:
    found = {}
    for f in path.iterdir():
        m = _META_SHARD.match(f.name)
        if m:
            i = int(m.group(1) or 0)
            if i in found:
                raise CheckpointError(f"{path}: both {found[i].name} and {f.name} claim shard {i}")
            found[i] = f
    if not found:
        raise CheckpointError(f"{path}: {META_PARAMS} but no consolidated.*.pth")
    n = len(found)
    if sorted(found) != list(range(n)):
        raise CheckpointError(f"{path}: consolidated.*.pth shards must be numbered 00..{n - 1:02d}, "
                              f"found {sorted(found)}")
    return [found[i] for i in range(n)]


def _torch_load(f: Path) -> dict:
    try:
        # io.BytesIO (and the bytes it pickles) appear as `_extra_state` entries; dropped by name later
        with torch.serialization.safe_globals([io.BytesIO, bytes]):
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # UnpicklingError (not weights-only), RuntimeError (truncated / not a zip)
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        why = next((l for l in lines if "Unsupported global" in l or "error" in l.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{f}: cannot read as a weights-only torch checkpoint "
                              f"({type(e).__name__}: {why})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: holds a {type(sd).__name__}, expected a dict of tensors")
    return sd


def load_meta(path, dtype=None, device=None) -> Transformer:
    path = as_path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    params_file = path / META_PARAMS
    args = meta.args_from_meta_params(_read_json(params_file), str(params_file))
    files = _meta_shards(path)
    n = len(files)
    if args.n_heads % n or args.n_kv_heads % n:
        raise CheckpointError(f"{path}: {n} model-parallel shards do not divide n_heads ({args.n_heads}) "
                              f"and n_kv_heads ({args.n_kv_heads})")
    model = build_on_meta(args)
    shards = [meta.unfuse_shard(_torch_load(f), args, n, str(f)) for f in files]
    merged = meta.to_ours(meta.merge_shards(shards, [str(f) for f in files]))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    src = str(files[0]) if n == 1 else f"{path}/consolidated.*.pth"
    check_keys(expected, merged, src)
    for k, t in merged.items():
        check_shape(k, t.shape, expected[k], src)
    if dtype is None:
        dtype = merged["tok_embeddings.weight"].dtype
    state = {k: t.to(device=device, dtype=dtype) for k, t in merged.items()}
    return materialize(model, state, device, src)


# --------------------------------------------------------------------------------------------
# save

def _parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB" (powers of 1000) or "512MiB" (powers of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    if not m or not float(m.group(1)) > 0:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB', '500MB')")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _host_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # a view into a larger storage (e.g. q/k/v split from Meta's wqkv)
    return t


def _fsync(p: Path):
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(model, path, max_shard_size="5GB", dtype=None, tokenizer=None, temperature=None, top_p=None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint that transformers loads: ``Llama4ForCausalLM``
    for a `Transformer`, ``Llama4ForConditionalGeneration`` for a `MultimodalTransformer`.

    ``max_shard_size``: bytes, or a string such as "5GB"; larger models are split into
    model-0000k-of-0000n.safetensors with model.safetensors.index.json. ``dtype``: the dtype
    written (default: the model's). ``tokenizer`` (a `Tokenizer`, or a path `load_tokenizer` reads;
    None writes weights only): adds the files that make the folder a complete Hugging Face model
    (tokenizer.json, tokenizer_config.json with Llama 4's chat template, special_tokens_map.json,
    generation_config.json with ``temperature`` / ``top_p``, default 0.6 / 0.9, and our
    tokenizer.model; ``llama4.tokenizer.hf_files``). Returns the directory."""
    from safetensors.torch import save_file

    model = unwrap_model(model)
    if getattr(model, "quantization", None):  # set by llama4.quant's loader
        raise CheckpointError(f"{path}: cannot save a quantized model ({model.quantization['scheme']}) as a float "
                              "checkpoint; `llama4 quantize` writes quantized folders from the float model")
    args = model.args
    path = as_path(path)
    dtype = resolve_dtype(dtype, "save(dtype=...)")
    limit = _parse_size(max_shard_size)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: exists and is not a directory")
        foreign = [p.name for p in path.iterdir() if not _OWN_FILES.match(p.name)]
        if foreign:
            raise CheckpointError(f"{path}: exists and holds files a checkpoint save would not write "
                                  f"({describe(foreign, 4)}); refusing to replace it")
    extra = _tokenizer_files(tokenizer, args, temperature, top_p) if tokenizer is not None else {}
    state = _plain_state_dict(model)
    if isinstance(model, MultimodalTransformer):
        args, state = fold_forward_multipliers(args, state, hf.MM_OURS_TEXT_PREFIX)
        layout = dict(n_vision_layers=model.vision_args.n_layers)
        out_dtype = dtype or state[hf.MM_OURS_TEXT_PREFIX + "tok_embeddings.weight"].dtype
        cfg = hf_vision.hf_mm_config_from_args(args, model.vision_args, model.image_token_id, out_dtype)
    else:
        args, state = fold_forward_multipliers(args, state)
        layout = {}
        out_dtype = dtype or state["tok_embeddings.weight"].dtype
        cfg = hf.hf_config_from_args(args, out_dtype)

    # Shard plan from sizes alone (HF names in table order); data converted one shard at a time.
    names, sizes, groups = [], {}, hf.plan(state.keys(), args.n_layers, **layout)
    for g in groups:
        numel = sum(state[k].numel() for k in g.ours)
        per = numel // len(g.hf)
        for n in g.hf:
            names.append(n)
            sizes[n] = per * (dtype or state[g.ours[0]].dtype).itemsize
    shards, cur, cur_size = [], [], 0
    for n in names:
        if cur and cur_size + sizes[n] > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(n)
        cur_size += sizes[n]
    shards.append(cur)
    shard_of = {n: i for i, s in enumerate(shards) for n in s}

    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        (tmp / HF_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        mode = (tmp / HF_CONFIG).stat().st_mode & 0o777
        buffers: list[dict[str, torch.Tensor]] = [{} for _ in shards]
        fnames = [SAFE_SINGLE] if len(shards) == 1 else [_SHARD_NAME.format(i + 1, len(shards))
                                                          for i in range(len(shards))]
        written = 0
        for g in groups:  # table order == shard order, so each shard completes before the next
            for n, t in zip(g.hf, g.rule.to_hf([state[k] for k in g.ours])):
                i = shard_of[n]
                t = _host_tensor(t, dtype)
                if any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in buffers[i].values()):
                    t = t.clone()  # tied weights (lm_head is the embedding) are written as two tensors
                buffers[i][n] = t
                if len(buffers[i]) == len(shards[i]):
                    save_file(buffers[i], str(tmp / fnames[i]), metadata={"format": "pt"})
                    os.chmod(tmp / fnames[i], mode)  # safetensors writes 0600; use the umask like config.json
                    _fsync(tmp / fnames[i])
                    buffers[i] = {}
                    written += 1
        if written != len(shards):  # cannot happen: every planned tensor was produced
            raise CheckpointError(f"{path}: internal error, wrote {written} of {len(shards)} shards")
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: fnames[shard_of[n]] for n in names}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
            os.chmod(tmp / name, mode)
            _fsync(tmp / name)
        _fsync(tmp / HF_CONFIG)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _tokenizer_files(tokenizer, args, temperature, top_p) -> dict[str, bytes]:
    from llama4.tokenizer import Tokenizer, load_tokenizer
    from llama4.tokenizer.hf_files import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, hf_tokenizer_files

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.n_words > args.vocab_size:
        raise ValueError(f"save(tokenizer=...): the tokenizer has {tok.n_words} tokens but the model's vocabulary "
                         f"is only {args.vocab_size}")
    return hf_tokenizer_files(tok, args.max_seq_len, DEFAULT_TEMPERATURE if temperature is None else temperature,
                              DEFAULT_TOP_P if top_p is None else top_p)


def _plain_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ``torch.nn.utils.parametrize`` parametrization (e.g. LoRA
    adapters, llama4.posttrain.lora) folded in: the weight the forward uses, under its plain name."""
    from torch.nn.utils import parametrize

    state = model.state_dict()
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            pre = f"{path}." if path else ""
            for name in list(mod.parametrizations):
                for k in [k for k in state if k.startswith(f"{pre}parametrizations.{name}.")]:
                    del state[k]
                state[f"{pre}{name}"] = getattr(mod, name).detach()
    return state


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
    else:
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync(path.parent)
    except OSError:
        pass
