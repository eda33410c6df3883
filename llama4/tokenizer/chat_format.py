"""Llama 4's chat format: OpenAI-style messages <-> token ids.

A dialog is ``<|begin_of_text|>`` then, per message,
``<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>`` (``<|eom|>`` ends a tool result
and an assistant turn that calls a tool), and for generation a trailing assistant header. Tool
results use the header ``ipython``. Identical ids to Meta's
``llama_models.llama4.chat_format.ChatFormat.encode_dialog_prompt``.

Messages are dicts: ``{"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": ...}``
where content is a str or a list of parts: ``{"type": "text", "text": str}`` or
``{"type": "image", "grid": (rows, cols)}``; ``grid`` is the image's tile layout as chosen by
the image preprocessor (``(1, 1)`` is a single tile with no global thumbnail). Assistant
messages may carry OpenAI ``tool_calls`` and ``stop_reason`` (``"end_of_message"``); user
messages may carry RAG ``context``. Only this module inserts control tokens; text is always
encoded as ordinary text.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Sequence

from llama4.tokenizer.tokenizer import Tokenizer
from llama4.tokenizer.tool_calls import encode_tool_call, parse_tool_calls

# 336 px tiles, 14 px patches -> 24x24 patches, pixel shuffle 0.5 -> 144 tokens per tile.
PATCHES_PER_TILE = 144
_HEADER_ROLE = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "ipython",
    "ipython": "ipython",
}


def encode_header(tok: Tokenizer, role: str) -> list[int]:
    if role not in _HEADER_ROLE:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(_HEADER_ROLE)}")
    sp = tok.special_tokens
    return [
        sp["<|header_start|>"],
        *tok.encode(_HEADER_ROLE[role]),
        sp["<|header_end|>"],
        *tok.encode("\n\n"),
    ]


def encode_image_tokens(
    tok: Tokenizer, grid: Sequence[int], patches_per_tile: int = PATCHES_PER_TILE
) -> list[int]:
    """The placeholder ids for one image tiled ``grid = (rows, cols)``: each tile's patches row
    by row with x/y separators, then ``<|image|>`` and the global thumbnail's patches (only when
    there is more than one tile)."""
    rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"image grid must be positive (rows, cols), got {tuple(grid)}")
    sp = tok.special_tokens
    patch = [sp["<|patch|>"]] * patches_per_tile
    ids = [sp["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += patch
                if x < cols - 1:
                    ids.append(sp["<|tile_x_separator|>"])
            ids.append(sp["<|tile_y_separator|>"])
    ids.append(sp["<|image|>"])
    ids += patch
    ids.append(sp["<|image_end|>"])
    return ids


def encode_content(
    tok: Tokenizer, content: Any, bos: bool = False, patches_per_tile: int = PATCHES_PER_TILE
) -> list[int]:
    """Ids of a message content (str or list of parts); each text part is encoded on its own,
    as Meta does. ``bos`` prepends ``<|begin_of_text|>`` (raw completion prompts)."""
    parts = content if isinstance(content, list) else [content]
    ids = [tok.bos_id] if bos else []
    for part in parts:
        if part is None:
            continue
        if isinstance(part, str):
            ids += tok.encode(part)
            continue
        if not isinstance(part, dict):
            raise TypeError(f"content part must be a str or dict, got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            ids += tok.encode(part["text"])
        elif kind in ("image", "image_url"):
            if "grid" not in part:
                raise ValueError(
                    "an image part needs 'grid': (rows, cols), its tile layout from the image "
                    "preprocessor"
                )
            ids += encode_image_tokens(tok, part["grid"], patches_per_tile)
        else:
            raise ValueError(f"unknown content part type {kind!r} (expected 'text' or 'image')")
    return ids


def _tool_calls_of(message: dict) -> list[tuple[str, dict]]:
    calls = []
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function", tc)
        name = fn.get("name", fn.get("tool_name"))
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(name, str) or not isinstance(args, dict):
            raise ValueError(f"tool call needs a str name and dict arguments, got {tc!r}")
        calls.append((name, args))
    return calls


def encode_message_parts(
    tok: Tokenizer,
    message: dict,
    tool_prompt_format: str = "json",
    patches_per_tile: int = PATCHES_PER_TILE,
) -> tuple[list[int], list[int]]:
    """``(header_ids, body_ids)`` of one message; the body ends with ``<|eot|>``/``<|eom|>``."""
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"a message must be a dict with a 'role', got {message!r}")
    role = message["role"]
    header = encode_header(tok, role)
    body = encode_content(tok, message.get("content"), patches_per_tile=patches_per_tile)
    if role == "user" and message.get("context") is not None:
        context = encode_content(tok, message["context"], False, patches_per_tile)
        body += tok.encode("\n\n") + context
    calls = _tool_calls_of(message) if role == "assistant" else []
    for name, args in calls:
        body += tok.encode(encode_tool_call(name, args, tool_prompt_format))
    if role == "assistant":
        eom = message.get("stop_reason") == "end_of_message" or bool(calls)
    else:
        eom = role in ("tool", "ipython")
    body.append(tok.eom_id if eom else tok.eot_id)
    return header, body


def encode_message(tok: Tokenizer, message: dict, tool_prompt_format: str = "json") -> list[int]:
    header, body = encode_message_parts(tok, message, tool_prompt_format)
    return header + body


def encode_dialog_prompt(
    tok: Tokenizer,
    messages: Sequence[dict],
    tool_prompt_format: str = "json",
    patches_per_tile: int = PATCHES_PER_TILE,
) -> list[int]:
    """Prompt ids for generating the next assistant turn (ends with the assistant header)."""
    ids, _ = encode_dialog(tok, messages, tool_prompt_format, patches_per_tile, True)
    return ids


def encode_dialog(
    tok: Tokenizer,
    messages: Sequence[dict],
    tool_prompt_format: str = "json",
    patches_per_tile: int = PATCHES_PER_TILE,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` for supervised fine-tuning. ``loss_mask[i]`` is True when token i
    is written by the assistant (its content, tool calls and closing ``<|eot|>``/``<|eom|>``):
    the tokens whose prediction the SFT loss counts. Headers, BOS and all other turns are False.
    """
    ids, mask = [tok.bos_id], [False]
    for message in messages:
        header, body = encode_message_parts(tok, message, tool_prompt_format, patches_per_tile)
        train = message["role"] == "assistant"
        ids += header + body
        mask += [False] * len(header) + [train] * len(body)
    if add_generation_prompt:
        header = encode_header(tok, "assistant")
        ids += header
        mask += [False] * len(header)
    return ids, mask


def decode_assistant_message(tok: Tokenizer, ids: Sequence[int]) -> dict:
    """Generated ids -> an OpenAI-style assistant message.

    Decoding stops at the first ``<|eot|>`` (``stop_reason`` ``"end_of_turn"``), ``<|eom|>``
    (``"end_of_message"``, the model waits for a tool result) or ``<|end_of_text|>``; without
    one the reason is ``"out_of_tokens"``. Tool calls are parsed as Meta's
    ``decode_assistant_message`` parses them; when there is one, ``content`` is empty.
    """
    ids = list(ids)
    stops = {tok.eot_id: "end_of_turn", tok.eom_id: "end_of_message", tok.eos_id: "end_of_turn"}
    cut = next((k for k, i in enumerate(ids) if i in stops), None)
    stop_reason = "out_of_tokens" if cut is None else stops[ids[cut]]
    content = tok.decode(ids if cut is None else ids[:cut])
    # Meta strips spaces from the decoded text *with* the stop token's spelling at its end, so
    # trailing spaces before a stop token survive.
    content = content.strip(" ") if cut is None else content.lstrip(" ")
    header = "<|header_start|>assistant<|header_end|>\n\n"
    if content.startswith(header):
        content = content[len(header) :]
    ipython = content.startswith("<|python_start|>")
    if ipython:
        content = content[len("<|python_start|>") :].replace("<|python_end|>", "")
    calls = parse_tool_calls(content, ipython)
    tool_calls = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for name, args in calls
    ]
    return {
        "role": "assistant",
        "content": "" if tool_calls else content,
        "tool_calls": tool_calls,
        "stop_reason": stop_reason,
    }
