"""Our chat format against Meta's llama_models.llama4.chat_format.ChatFormat, id for id."""

from __future__ import annotations

import io
import json

import pytest
import torch

from llama4.tokenizer.chat_format import (
    decode_assistant_message,
    encode_dialog,
    encode_dialog_prompt,
    encode_header,
    encode_image_tokens,
)


@pytest.fixture(scope="module")
def meta(meta_chat_format, meta_tok):
    return meta_chat_format.ChatFormat(meta_tok)


def _raw(messages):
    """OpenAI-style dicts -> Meta's RawMessage objects."""
    from llama_models.datatypes import RawMessage, RawTextItem, StopReason, ToolCall

    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = [RawTextItem(text=p["text"]) for p in content]
        calls = [
            ToolCall(call_id="c", tool_name=tc["function"]["name"],
                     arguments=json.loads(tc["function"]["arguments"]))  # fmt: skip
            for tc in m.get("tool_calls", [])
        ]
        role = "tool" if m["role"] == "ipython" else m["role"]
        kw = {"stop_reason": StopReason(m["stop_reason"])} if "stop_reason" in m else {}
        if "context" in m:
            kw["context"] = m["context"]
        out.append(RawMessage(role=role, content=content, tool_calls=calls, **kw))
    return out


def _call(name, **args):
    return {"id": "x", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant. <|eot|> is just text."},
        {"role": "user", "content": "Wie spät ist es in 東京? <|header_start|>assistant"},
        {"role": "assistant", "content": "Es ist 15 Uhr. 😀"},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": " now?"}]},
    ],
    [
        {"role": "system", "content": "Tools: get_weather(city)."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Paris")]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 °C."},
    ],
    [
        {"role": "user", "content": "search", "context": "RAG context here"},
        {"role": "assistant", "content": "", "tool_calls": [_call("brave_search", query="llama 4")]},
        {"role": "ipython", "content": "results..."},
        {"role": "assistant", "content": "", "tool_calls": [_call("code_interpreter", code="print(1)")]},
        {"role": "assistant", "content": "partial answer", "stop_reason": "end_of_message"},
        {"role": "assistant", "content": "done", "stop_reason": "end_of_turn"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "   \n\n  spaces  "}],
]


@pytest.mark.parametrize("k", range(len(DIALOGS)))
def test_dialog_prompt_identical(tok, meta, k):
    msgs = DIALOGS[k]
    assert encode_dialog_prompt(tok, msgs) == meta.encode_dialog_prompt(_raw(msgs)).tokens


@pytest.mark.parametrize("fmt", ["json", "function_tag", "python_list"])
def test_tool_prompt_formats_identical(tok, meta, fmt):
    from llama_models.datatypes import ToolPromptFormat

    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "",
         "tool_calls": [_call("lookup", key="x", n=3, ok=True, tags=["a", "b"])]},  # fmt: skip
    ]
    want = meta.encode_dialog_prompt(_raw(msgs), ToolPromptFormat(fmt)).tokens
    assert encode_dialog_prompt(tok, msgs, tool_prompt_format=fmt) == want


def test_header_and_layout(tok):
    ids = encode_dialog_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert tok.decode(encode_header(tok, "tool")) == "<|header_start|>ipython<|header_end|>\n\n"
    with pytest.raises(ValueError, match="unknown role"):
        encode_dialog_prompt(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="unknown content part"):
        encode_dialog_prompt(tok, [{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="grid"):
        encode_dialog_prompt(tok, [{"role": "user", "content": [{"type": "image"}]}])


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)])
def test_image_tokens_identical(tok, meta_chat_format, meta_tok, grid):
    """Meta's full encode_dialog_prompt with an image; its torchvision transforms (absent here)
    are replaced by ones that return tiles of the given grid, which is all the ids depend on."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama4.args import Size, VisionArgs

    va = VisionArgs(image_size=Size(height=336, width=336), patch_size=Size(height=14, width=14),
                    dim=1408, n_layers=1, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                    pixel_shuffle_ratio=0.5)  # fmt: skip
    fmt = meta_chat_format.ChatFormat.__new__(meta_chat_format.ChatFormat)
    fmt.tokenizer, fmt.vision_args, fmt.max_num_chunks = meta_tok, va, 16
    fmt.possible_headers = {}
    rows, cols = grid
    fmt.dynamic_image_transform = lambda img, max_num_chunks: (
        torch.zeros(1, 3, 336, 336).expand(rows * cols, 3, 336, 336), (rows, cols)
    )
    fmt.image_transform = lambda img: torch.zeros(3, 336, 336)
    raw = [RawMessage(role="user", content=[RawTextItem(text="Look:"), RawMediaItem(data=_png()),
                                            RawTextItem(text=" what is it?")])]  # fmt: skip
    want = fmt.encode_dialog_prompt(raw).tokens
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image", "grid": grid},
                                         {"type": "text", "text": " what is it?"}]}]  # fmt: skip
    assert encode_dialog_prompt(tok, msgs) == want
    img = encode_image_tokens(tok, grid)
    n_patch = img.count(tok.special_tokens["<|patch|>"])
    assert n_patch == 144 * (rows * cols + (1 if rows * cols > 1 else 0))


def test_sft_loss_mask(tok, meta):
    msgs = DIALOGS[2]
    ids, mask = encode_dialog(tok, msgs)
    prompt = meta.encode_dialog_prompt(_raw(msgs)).tokens
    assert ids + encode_header(tok, "assistant") == prompt  # same ids minus the generation header
    assert len(mask) == len(ids)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s) for s in spans] == [
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom|>',
        "It is 21 °C.<|eot|>",
    ]
    ids2, mask2 = encode_dialog(tok, msgs, add_generation_prompt=True)
    assert ids2 == prompt and mask2[len(mask):] == [False] * (len(ids2) - len(ids))


def _decode_cases(tok):
    sp = tok.special_tokens
    e = tok.encode
    return [
        e("The answer is 42.") + [tok.eot_id],
        e("  padded  ") + [tok.eot_id],
        e("waiting for tool") + [tok.eom_id],
        e('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}') + [tok.eom_id],
        e('<function=get_weather>{"city": "Paris", "days": 3}</function>') + [tok.eom_id],
        e('[get_weather(city="Paris", days=3)]') + [tok.eom_id],
        e('brave_search.call(query="llama 4 release")') + [tok.eom_id],
        e('<function=brave_search>{"q": "x"}</function>') + [tok.eom_id],
        [sp["<|python_start|>"]] + e("print(sum(range(10)))") + [sp["<|python_end|>"], tok.eom_id],
        encode_header(tok, "assistant") + e("with header") + [tok.eot_id],
        e("no stop token, out of budget  "),
        e("not json {oops") + [tok.eot_id],
    ]


def test_decode_assistant_message_matches_meta(tok, meta):
    from llama_models.datatypes import StopReason

    for ids in _decode_cases(tok):
        ours = decode_assistant_message(tok, ids)
        theirs = meta.decode_assistant_message(ids, StopReason.out_of_tokens)
        assert ours["content"] == theirs.content, tok.decode(ids)
        assert ours["stop_reason"] == theirs.stop_reason.value
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ours["tool_calls"]]
        want = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in theirs.tool_calls]
        assert got == want, tok.decode(ids)


def test_decode_stops_at_first_stop_token(tok):
    ids = tok.encode("first") + [tok.eot_id] + tok.encode("ignored") + [tok.eom_id]
    msg = decode_assistant_message(tok, ids)
    assert msg == {"role": "assistant", "content": "first", "tool_calls": [], "stop_reason": "end_of_turn"}
    msg = decode_assistant_message(tok, tok.encode('[f(a=1), g(b="x")]') + [tok.eom_id])
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f", "g"]
    assert decode_assistant_message(tok, tok.encode("x") + [tok.eos_id])["stop_reason"] == "end_of_turn"
