"""GGUF export: our model as llama.cpp's ``llama4`` architecture, named and keyed as llama.cpp's own
converter (``convert_hf_to_gguf.py``, class ``Llama4Model`` for ``Llama4ForCausalLM``) writes it.

    export_gguf("runs/x/final", "x.gguf", "q8_0")        # llama4 export gguf --model DIR --out FILE
    write_gguf(model, tokenizer, "x.gguf", "f32")        # from a model in memory

llama.cpp reads only some of Llama 4's settings from the file and hard-codes the rest
(``src/models/llama4.cpp``, ``src/llama-graph.cpp`` of the llama.cpp that llama-cpp-python 0.3.36
vendors); ``HARD_CODED`` lists them. A model that differs from them would load and run with
silently different semantics, so `llama_cpp_mismatches` names every such difference and the
export refuses; where a key can say it (MoE placement), the key is written instead.

Tensors: weights as our model uses them, in ggml's order (a numpy array's last axis is ggml's
ne0, the reduction axis): Linear weights (out, in) as they are, routed experts transposed from
our ``x @ W`` (E, in, out) to (E, out, in). With ``f16``/``q8_0``/``q4_0`` every weight matrix
is stored in that type except the router (``ffn_gate_inp``, kept f32 as the converter does) and
the 1-D norms; a matrix whose rows are not whole 32-blocks falls back to f16, as in the converter.
The tokenizer is our byte-level BPE as a ``gpt2`` model with pre-tokenizer ``llama4``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llama4.checkpoint.common import CheckpointError, build_on_meta, unwrap_model
from llama4.checkpoint.fold import fold_forward_multipliers
from llama4.model import ModelArgs, MultimodalTransformer, Transformer
from llama4.model.layers import rope_inv_freq

ARCH = "llama4"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")

# What llama.cpp's Llama 4 fixes at load (llama_model_llama4::load_arch_hparams and the graph),
# whatever the file says; the export refuses a model that differs (see llama_cpp_mismatches).
HARD_CODED = {
    "chunk": 8192,  # hparams.n_swa: chunked attention of the RoPE layers
    "nope_interval": 4,  # hparams.n_no_rope_layer_step: layer i has no RoPE iff (i + 1) % 4 == 0
    "floor_scale": 8192,  # hparams.n_attn_temp_floor_scale (temperature tuning of NoPE layers)
    "attn_scale": 0.1,  # hparams.f_attn_temp_scale
    "no_qk_norm_experts": 128,  # use_kq_norm = (n_expert != 128): QK-norm off only for Maverick
}

# our tensor (``{i}`` = layer) -> llama.cpp's (``{i}`` = block), and the layout change
_SAME: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


def _experts(t: torch.Tensor) -> torch.Tensor:  # ours (E, in, out), x @ W -> ggml (E, out, in)
    return t.transpose(-1, -2)


TENSOR_TABLE: tuple[tuple[str, str, Callable], ...] = (
    ("tok_embeddings.weight", "token_embd.weight", _SAME),
    ("layers.{i}.attention_norm.weight", "blk.{i}.attn_norm.weight", _SAME),
    ("layers.{i}.attention.wq.weight", "blk.{i}.attn_q.weight", _SAME),
    ("layers.{i}.attention.wk.weight", "blk.{i}.attn_k.weight", _SAME),
    ("layers.{i}.attention.wv.weight", "blk.{i}.attn_v.weight", _SAME),
    ("layers.{i}.attention.wo.weight", "blk.{i}.attn_output.weight", _SAME),
    ("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight", _SAME),
    # dense FFN layers
    ("layers.{i}.feed_forward.w1.weight", "blk.{i}.ffn_gate.weight", _SAME),
    ("layers.{i}.feed_forward.w3.weight", "blk.{i}.ffn_up.weight", _SAME),
    ("layers.{i}.feed_forward.w2.weight", "blk.{i}.ffn_down.weight", _SAME),
    # MoE layers: router (E, D), stacked routed experts, shared expert
    ("layers.{i}.feed_forward.router.weight", "blk.{i}.ffn_gate_inp.weight", _SAME),
    ("layers.{i}.feed_forward.experts.w1", "blk.{i}.ffn_gate_exps.weight", _experts),
    ("layers.{i}.feed_forward.experts.w3", "blk.{i}.ffn_up_exps.weight", _experts),
    ("layers.{i}.feed_forward.experts.w2", "blk.{i}.ffn_down_exps.weight", _experts),
    ("layers.{i}.feed_forward.shared_expert.w1.weight", "blk.{i}.ffn_gate_shexp.weight", _SAME),
    ("layers.{i}.feed_forward.shared_expert.w3.weight", "blk.{i}.ffn_up_shexp.weight", _SAME),
    ("layers.{i}.feed_forward.shared_expert.w2.weight", "blk.{i}.ffn_down_shexp.weight", _SAME),
    ("norm.weight", "output_norm.weight", _SAME),
    ("output.weight", "output.weight", _SAME),
)
ROPE_FREQS = "rope_freqs.weight"  # llama3-style scaling: 1-D factors that divide each frequency
ALWAYS_F32 = ("ffn_gate_inp.weight",)  # kept float32 by the converter at every --outtype


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise ValueError("GGUF export needs the 'gguf' package (gguf-py 0.19: pip install gguf==0.19.0; "
                         "bash scripts/setup.sh installs it)") from None
    return gguf


# --------------------------------------------------------------------------------------------
# what llama.cpp would compute differently

def moe_step(args: ModelArgs) -> int | None:
    """The ``interleave_moe_layer_step`` whose rule (i + 1) % step == 0 gives this model's MoE
    layers (llama.cpp's only way to place them), or None when no step does."""
    want = [args.is_moe_layer(i) for i in range(args.n_layers)]
    for step in dict.fromkeys([args.interleave_moe_layer_step, *range(1, args.n_layers + 2)]):
        if want == [(i + 1) % step == 0 for i in range(args.n_layers)]:
            return step
    return None


def llama_cpp_mismatches(args: ModelArgs) -> list[str]:
    """Every way llama.cpp's Llama 4 would run this model differently from ours (empty: none)."""
    hc, L = HARD_CODED, args.n_layers
    out = []
    if not args.n_experts:
        out.append("n_experts = 0 (every FFN dense): llama.cpp's llama4 refuses a model without experts")
    elif moe_step(args) is None:
        moe = [i for i in range(L) if args.is_moe_layer(i)]
        out.append(f"MoE layers {moe} are not every k-th layer; llama.cpp places them by "
                   "(i + 1) % interleave_moe_layer_step == 0 only")
    nope = [i for i in range(L) if args.is_nope_layer(i)]
    cpp_nope = [i for i in range(L) if (i + 1) % hc["nope_interval"] == 0]
    if nope != cpp_nope:
        out.append(f"NoPE layers {nope}: llama.cpp hard-codes NoPE on every {hc['nope_interval']}th layer "
                   f"({cpp_nope}), whatever the file says")
    if len(nope) < L and args.attention_chunk_size != hc["chunk"]:
        out.append(f"attention_chunk_size = {args.attention_chunk_size}: llama.cpp hard-codes chunked attention "
                   f"of {hc['chunk']} tokens on the RoPE layers")
    if nope:
        if not args.attn_temperature_tuning:
            out.append("attn_temperature_tuning is off: llama.cpp always scales the NoPE layers' queries "
                       f"(floor {hc['floor_scale']}, scale {hc['attn_scale']})")
        elif args.floor_scale != hc["floor_scale"] or not math.isclose(args.attn_scale, hc["attn_scale"], rel_tol=1e-6):
            out.append(f"temperature tuning floor_scale = {args.floor_scale:g}, attn_scale = {args.attn_scale:g}: "
                       f"llama.cpp hard-codes {hc['floor_scale']} and {hc['attn_scale']}")
    if len(nope) < L:
        cpp_qk = args.n_experts != hc["no_qk_norm_experts"]
        if args.use_qk_norm != cpp_qk:
            out.append(f"use_qk_norm = {args.use_qk_norm}: llama.cpp applies QK-norm iff the model does not have "
                       f"{hc['no_qk_norm_experts']} experts (n_experts = {args.n_experts})")
    if args.attention_bias:
        out.append("attention_bias = True: llama.cpp's llama4 loads no bias for the attention output")
    return out


def check_llama_cpp(args: ModelArgs) -> None:
    bad = llama_cpp_mismatches(args)
    if bad:
        raise CheckpointError("cannot export to GGUF: llama.cpp would silently run a different model:\n  - "
                              + "\n  - ".join(bad))


# --------------------------------------------------------------------------------------------
# tensors

@dataclass
class _Planned:
    name: str
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple  # ggml-ordered numpy shape of the float tensor
    make: Callable[[], torch.Tensor]


def _plan(args: ModelArgs, state: dict[str, torch.Tensor], gguf_type: str, notes: list[str]) -> list[_Planned]:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    ftype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
    known = {gguf.TENSOR_NAMES[t].format(bid="{i}") + ".weight" for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA4]}
    out, covered, fallback = [], set(), []

    def add(name: str, make: Callable[[], torch.Tensor], shape: tuple):
        qt = Q.F32 if len(shape) == 1 or name.endswith(("_norm.weight",) + ALWAYS_F32) else ftype
        if qt in (Q.Q8_0, Q.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
            qt = Q.F16
            fallback.append(name)
        out.append(_Planned(name, qt, shape, make))

    if args.rope_scaling is not None:
        # ggml divides each frequency by its factor: factor = unscaled / scaled, from our own formula
        f = rope_inv_freq(args.hd, args.rope_theta, None) / rope_inv_freq(args.hd, args.rope_theta, args.rope_scaling)
        add(ROPE_FREQS, lambda f=f: f, tuple(f.shape))
    glob = [r for r in TENSOR_TABLE if "{i}" not in r[0]]
    order = ([(glob[0], None)] + [(r, i) for i in range(args.n_layers) for r in TENSOR_TABLE if "{i}" in r[0]]
             + [(r, None) for r in glob[1:]])  # embedding, block by block, final norm and head
    for (ours, theirs, fn), i in order:
        k = ours.format(i=i)
        if k not in state:  # dense vs MoE layers pick their rules
            continue
        name = theirs.format(i=i)
        if theirs not in known:  # pragma: no cover
            raise CheckpointError(f"internal error: {name} is not a llama4 tensor in gguf-py's table")
        shape = tuple(fn(state[k].new_empty(state[k].shape, device="meta")).shape)
        add(name, lambda k=k, fn=fn: fn(state[k]), shape)
        covered.add(k)
    left = set(state) - covered
    if left:
        raise CheckpointError(f"no GGUF name for tensor(s) {sorted(left)}")
    if fallback:
        notes.append(f"{len(fallback)} tensor(s) stored as f16, their rows not whole {gguf_type} blocks of 32 "
                     f"(as llama.cpp's converter does): {', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}")
    return out


def _encode(p: _Planned):
    """-> the tensor's bytes-to-be as numpy (f32/f16 array, or uint8 blocks)."""
    gguf = _gguf()
    data = p.make().detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, p.qtype)


# --------------------------------------------------------------------------------------------
# tokenizer

def _add_tokenizer(w, tok, vocab_size: int, context: int) -> None:
    """Our tokenizer as the converter's ``_set_vocab_gpt2`` writes a tokenizer.json: tokens,
    token types, merges and special ids (gguf-py's own SpecialVocab over our HF tokenizer files),
    plus the ids of ``<|eot|>`` and ``<|eom|>``: llama.cpp does not recognise those names as
    end-of-generation, and our generation stops at them."""
    gguf = _gguf()
    from llama4.tokenizer.hf_files import tokenizer_config, tokenizer_json
    from llama4.tokenizer.special_tokens import SPLIT_PATTERN

    if tok.n_words > vocab_size:
        raise ValueError(f"the tokenizer has {tok.n_words} tokens but the model's vocabulary is only {vocab_size}")
    tj_text = tokenizer_json(tok)
    tj = json.loads(tj_text)
    pre = tj.get("pre_tokenizer") or {}
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if SPLIT_PATTERN not in splits:
        raise ValueError("the tokenizer does not split text with Llama 4's o200k pattern, which llama.cpp's "
                         "'llama4' pre-tokenizer hard-codes")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for s, i in tj["model"]["vocab"].items():
        tokens[i] = s
    for t in tj["added_tokens"]:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    for i in range(vocab_size):
        if tokens[i] is None:  # rows of the embedding past the tokenizer (the converter's padding)
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.json").write_text(tj_text, encoding="utf-8")
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, context)), encoding="utf-8")
        log = logging.getLogger("gguf.vocab")
        level, log.level = log.level, logging.ERROR  # its warning about our tokenizer.json's pair template
        try:
            gguf.SpecialVocab(d, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
        finally:
            log.setLevel(level)
    w.add_eot_token_id(tok.eot_id)
    w.add_eom_token_id(tok.eom_id)


# --------------------------------------------------------------------------------------------
# the file

@dataclass
class GGUFExport:
    path: Path
    gguf_type: str
    n_tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise ValueError(f"--out {out}: exists; refusing to overwrite it (remove it or pick another name)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create its folder ({e.strerror or e})") from None
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: its folder {out.parent} is not a writable directory")


def write_gguf(model, tokenizer, out, gguf_type: str = "f32", name: str | None = None,
               notes: list[str] | None = None) -> GGUFExport:
    """Write ``model`` (a float `Transformer`, or a multimodal model's text decoder) and
    ``tokenizer`` to the new file ``out``, atomically (a temp file beside it, renamed when
    complete and read back). Refuses models llama.cpp would run differently."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--type {gguf_type!r}: supported GGUF types are {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    notes = list(notes or [])
    model = unwrap_model(model)
    if isinstance(model, MultimodalTransformer):
        notes.append("text decoder only: llama.cpp reads the vision tower from a separate mmproj file")
        model = model.text
    if getattr(model, "quantization", None):
        raise CheckpointError("write_gguf needs a float model; export_gguf dequantizes quantized folders")
    args = model.args
    check_llama_cpp(args)
    args, state = fold_forward_multipliers(args, model.state_dict())
    expected = set(build_on_meta(args).state_dict())
    if set(state) != expected:
        raise CheckpointError(f"model tensors differ from its config's: missing {sorted(expected - set(state))[:4]}, "
                              f"extra {sorted(set(state) - expected)[:4]}")
    out = Path(out).expanduser()
    _check_out(out)
    planned = _plan(args, state, gguf_type, notes)

    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(None, ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or "llama4")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # the converter's TextModel / LlamaModel / Llama4Model.set_gguf_parameters, in its order
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.dense_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_expert_count(args.n_experts)
    w.add_expert_used_count(args.top_k)
    w.add_key_length(args.hd)
    w.add_value_length(args.hd)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.hd)
    w.add_interleave_moe_layer_step(moe_step(args))
    w.add_expert_feed_forward_length(args.expert_dim)
    _add_tokenizer(w, tokenizer, args.vocab_size, args.max_seq_len)
    for p in planned:
        if p.qtype in (Q.F32, Q.F16):
            dt = "float32" if p.qtype == Q.F32 else "float16"
            nbytes = math.prod(p.shape) * (4 if p.qtype == Q.F32 else 2)
            w.add_tensor_info(p.name, p.shape, _np_dtype(dt), nbytes, raw_dtype=p.qtype)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
            w.add_tensor_info(p.name, byte_shape, _np_dtype("uint8"), math.prod(byte_shape), raw_dtype=p.qtype)

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        try:
            w.write_header_to_file(path=Path(tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for p in planned:
                w.write_tensor_data(_encode(p))
            w.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write the file ({e.strerror or e})") from None
        finally:
            w.close()
        _verify(tmp, planned)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return GGUFExport(out, gguf_type, len(planned), out.stat().st_size, notes)


def _np_dtype(name: str):
    import numpy as np

    return np.dtype(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _verify(path, planned: list[_Planned]) -> None:
    """Read the written file back: every planned tensor, in its type and shape."""
    gguf = _gguf()
    r = gguf.GGUFReader(path)
    got = {t.name: (t.tensor_type, tuple(int(n) for n in reversed(t.shape))) for t in r.tensors}
    want = {p.name: (p.qtype, tuple(p.shape)) for p in planned}
    if got != want:
        raise CheckpointError(f"internal error: the written GGUF does not read back as planned "
                              f"({sorted(set(got) ^ set(want))[:4]})")


# --------------------------------------------------------------------------------------------
# a model folder

def export_gguf(model_dir, out, gguf_type: str = "f32") -> GGUFExport:
    """``llama4 export gguf``: the model folder ``model_dir`` (HF or Meta layout, a training run,
    or a `llama4 quantize` folder, which is dequantized) and its tokenizer to ``out``."""
    from llama4.infer.model_dir import load_tokenizer_for, resolve_model_dir

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--type {gguf_type!r}: supported GGUF types are {', '.join(GGUF_TYPES)}")
    _gguf()
    src = resolve_model_dir(model_dir)
    out = Path(out).expanduser()
    _check_out(out)  # before the (slow) load
    notes: list[str] = []
    model = _load_float(src, notes)
    check_llama_cpp(model.args)
    tok = load_tokenizer_for(src)
    if not any((src / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        notes.append("no tokenizer in the folder: wrote the official Llama 4 tokenizer")
    name = src.parent.name if src.name == "final" else src.name
    return write_gguf(model, tok, out, gguf_type, name=name, notes=notes)


def _load_float(src: Path, notes: list[str]) -> Transformer | MultimodalTransformer:
    from llama4.checkpoint.store import load

    cfg_file = src / "config.json"
    cfg = None
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: cannot read JSON: {e}") from None
    if not (isinstance(cfg, dict) and cfg.get("quantization_config")):
        return load(src)
    from llama4.quant.apply import dequantized_state
    from llama4.quant.checkpoint import load_quantized

    qmodel = load_quantized(src, cfg, path_choice="dequant")  # no kernel timing: only its weights are read
    scheme = qmodel.quantization["scheme"]
    model = build_on_meta(qmodel.args)
    model.load_state_dict(dequantized_state(qmodel), assign=True, strict=True)
    model.init_buffers()
    notes.append(f"dequantized from the folder's {scheme} weights (llama.cpp's own types are "
                 f"f16/q8_0/q4_0; the values written are the {scheme} model's)")
    return model
