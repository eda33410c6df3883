"""The Hugging Face tokenizer files of a model folder, so ``AutoTokenizer.from_pretrained(DIR)``,
``apply_chat_template`` and ``pipeline("text-generation", model=DIR)`` work on our exports as is.

    files = hf_tokenizer_files(tok, model_max_length=4096)   # {file name: bytes}
    llama4.save(model, DIR, tokenizer=tok)                     # writes them with the weights

* ``tokenizer.json``: the byte-level BPE for the ``tokenizers`` library, built from our tiktoken
  ranks the way transformers' ``TikTokenConverter`` builds the hub's Llama 4 file (every split
  of a token whose halves are tokens is a merge, ranked by the token; ``ignore_merges`` so a
  pre-token that is a whole token is that token, as in tiktoken), with the 2,048 special tokens
  at their ids and a post-processor that puts ``<|begin_of_text|>`` first, as ``encode(bos=True)``.
* ``tokenizer_config.json``: bos/eos/pad, and Llama 4's chat template (:data:`CHAT_TEMPLATE`),
  which renders exactly the ids of :func:`llama4.tokenizer.chat_format.encode_dialog_prompt`
  for string contents (Meta encodes each text part of a list content on its own; a template
  renders one string, so two adjacent text parts may tokenize differently at their seam).
* ``special_tokens_map.json``; ``tokenizer.model`` (our own tiktoken file, read first by
  :func:`llama4.tokenizer.load_tokenizer`).
* ``generation_config.json`` (:func:`generation_config`): bos/eos/pad ids and sampling defaults.
"""

from __future__ import annotations

import base64
import json

from llama4.tokenizer.byte_level import bytes_to_unicode
from llama4.tokenizer.files import read_tiktoken_bpe
from llama4.tokenizer.special_tokens import SPECIAL_TOKEN_NAMES, SPLIT_PATTERN
from llama4.tokenizer.tokenizer import Tokenizer

# Meta's defaults for Llama 4 (the hub's generation_config.json and llama-models' chat
# completion): what a model folder gets unless the caller picks others.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>"

# Llama 4's chat format (chat_format.py) as a Jinja template. Roles: system, user, assistant,
# tool / ipython (header "ipython", ends with <|eom|>); an assistant turn with tool_calls (or
# stop_reason "end_of_message") ends with <|eom|>; a user turn's RAG ``context`` follows "\n\n";
# image parts need their tile ``grid`` [rows, cols]; tool calls in the "json" prompt format
# (arguments as a dict, or as the JSON string OpenAI sends, spliced in verbatim).
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- set patch = '<|patch|>' * 144 -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}"
    "{%- if part['grid'] is not defined -%}{{- raise_exception(\"an image part needs 'grid': [rows, cols]\") -}}"
    "{%- endif -%}{%- set rows = part['grid'][0] -%}{%- set cols = part['grid'][1] -%}"
    "{{- '<|image_start|>' -}}"
    "{%- if rows * cols > 1 -%}{%- for r in range(rows) -%}{%- for c in range(cols) -%}{{- patch -}}"
    "{%- if not loop.last -%}{{- '<|tile_x_separator|>' -}}{%- endif -%}{%- endfor -%}"
    "{{- '<|tile_y_separator|>' -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|image|>' + patch + '<|image_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown content part type ' + part['type']) -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'tool', 'ipython'] -%}"
    "{{- raise_exception('unknown role ' + role) -}}{%- endif -%}"
    "{{- '<|header_start|>' + ('ipython' if role == 'tool' else role) + '<|header_end|>\\n\\n' -}}"
    "{{- render(message['content']) -}}"
    "{%- if role == 'user' and message['context'] is defined and message['context'] is not none -%}"
    "{{- '\\n\\n' -}}{{- render(message['context']) -}}{%- endif -%}"
    "{%- set calls = message['tool_calls'] if role == 'assistant' and message['tool_calls'] is defined "
    "and message['tool_calls'] else [] -%}"
    "{%- for call in calls -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if fn['arguments'] is string -%}"
    "{{- '{\"type\": \"function\", \"name\": ' + (fn['name'] | tojson(ensure_ascii=True)) + ', \"parameters\": '"
    " + fn['arguments'] + '}' -}}"
    "{%- else -%}"
    "{{- {'type': 'function', 'name': fn['name'], 'parameters': fn['arguments']} | tojson(ensure_ascii=True) -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if role in ['tool', 'ipython'] or calls or (role == 'assistant' and message['stop_reason'] is defined "
    "and message['stop_reason'] == 'end_of_message') -%}{{- '<|eom|>' -}}{%- else -%}{{- '<|eot|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}{%- endif -%}"
)


def _ranks(tok: Tokenizer) -> dict[bytes, int] | None:
    """The tiktoken ranks behind ``tok`` (None for a tokenizer read from a tokenizer.json)."""
    if tok.format != "tiktoken":
        return None
    if tok.path is None:
        return tok._ranks
    return read_tiktoken_bpe(tok.path)


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                 for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, a, b, left, right) for a, b, left, right in sorted(local)]
    merges.sort(key=lambda m: m[0])  # stable: within one token, by the halves' ranks
    return {s(t): r for t, r in ranks.items()}, [(s(m[3]), s(m[4])) for m in merges]


def tokenizer_json(tok: Tokenizer) -> str:
    """``tokenizer.json`` text for ``tok`` (same ids as ``tok.encode`` / ``tok.encode(bos=True)``)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    ranks = _ranks(tok)
    if ranks is None:  # already a tokenizer.json: keep its model, set our post-processor
        hf = HFTokenizer.from_file(str(tok.path))
    else:
        vocab, merges = _vocab_and_merges(ranks)
        hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in SPECIAL_TOKEN_NAMES])
    got = {n: hf.token_to_id(n) for n in SPECIAL_TOKEN_NAMES}
    if got != tok.special_tokens:
        bad = next(n for n in SPECIAL_TOKEN_NAMES if got[n] != tok.special_tokens.get(n))
        raise ValueError(f"tokenizer.json: special token {bad} got id {got[bad]}, expected "
                         f"{tok.special_tokens.get(bad)}")
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, tok.bos_id)]),
    ])
    return hf.to_str()


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(model_max_length),
        "padding_side": "left",  # batched generation pads on the left
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tok: Tokenizer, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                      ) -> dict:
    """``generation_config.json``: generation ends at any of the tokenizer's stop tokens
    (``<|end_of_text|>``, ``<|eom|>``, ``<|eot|>``); sampling with ``temperature`` / ``top_p``
    (``temperature`` 0 writes greedy decoding)."""
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise ValueError(f"generation config: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    cfg = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_tokens), "pad_token_id": tok.pad_id}
    if temperature == 0:
        cfg.update(do_sample=False)
    else:
        cfg.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    return cfg


def _tiktoken_bytes(ranks: dict[bytes, int]) -> bytes:
    return "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n"
                   for t, r in sorted(ranks.items(), key=lambda kv: kv[1])).encode("ascii")


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int, temperature: float = DEFAULT_TEMPERATURE,
                       top_p: float = DEFAULT_TOP_P) -> dict[str, bytes]:
    """Every tokenizer-side file of a Hugging Face model folder, ``{name: content}``."""
    def js(obj) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    files = {
        "tokenizer.json": tokenizer_json(tok).encode("utf-8"),
        "tokenizer_config.json": js(tokenizer_config(tok, model_max_length)),
        "special_tokens_map.json": js({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}),
        "generation_config.json": js(generation_config(tok, temperature, top_p)),
    }
    if tok.format == "tiktoken":
        files["tokenizer.model"] = tok.path.read_bytes() if tok.path is not None else _tiktoken_bytes(tok._ranks)
    return files
