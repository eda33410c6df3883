"""Tool calls as Llama 4 writes them in assistant turns (Meta's ``llama3.tool_utils`` format).

Built-in tools have their own syntax (``brave_search.call(query="...")``; code_interpreter is raw
code between ``<|python_start|>``/``<|python_end|>``). Custom tools are written in one of three
prompt formats: ``json`` (``{"type": "function", "name": ..., "parameters": {...}}``),
``function_tag`` (``<function=name>{...}</function>``) or ``python_list`` (``[name(a=1)]``).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Sequence

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")

_BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, list):
        return f"[{', '.join(_format_value(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k}={_format_value(v)}' for k, v in value.items())}}}"
    raise ValueError(f"unsupported tool argument type: {type(value).__name__}")


def encode_tool_call(name: str, arguments: dict, tool_prompt_format: str = "json") -> str:
    """The text an assistant turn carries for one tool call (``ToolUtils.encode_tool_call``)."""
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        return f'{name}.call(query="{arguments["query"]}")'
    if name == "code_interpreter":
        return arguments["code"]
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": arguments})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(arguments)}</function>"
    if tool_prompt_format == "python_list":
        args = ", ".join(f"{k}={_format_value(v)}" for k, v in arguments.items())
        return f"[{name}({args})]"
    raise ValueError(
        f"unknown tool_prompt_format {tool_prompt_format!r}; expected one of {TOOL_PROMPT_FORMATS}"
    )


def _python_list_calls(text: str) -> list[tuple[str, dict]] | None:
    """``[f(a=1), g(b="x")]`` -> ``[("f", {"a": 1}), ("g", {"b": "x"})]``; None if the text is
    not a non-empty list of keyword-only calls of plain names with literal arguments."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    expr = tree.body[0].value
    if not isinstance(expr, ast.List) or not expr.elts:
        return None
    calls = []
    for el in expr.elts:
        if not isinstance(el, ast.Call) or not isinstance(el.func, ast.Name) or el.args:
            return None
        try:
            calls.append((el.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in el.keywords}))
        except ValueError:  # a non-literal argument: not a tool call we can run
            return None
    return calls


def _json_call_sequence(text: str) -> list[tuple[str, dict]] | None:
    """Several JSON calls one after the other (what :func:`encode_tool_call` writes for an
    assistant turn with several calls; Meta's parser reads only a single object); None unless
    the whole text is two or more such objects."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        if not (isinstance(obj, dict) and "name" in obj and "parameters" in obj):
            return None
        calls.append((obj["name"], obj["parameters"]))
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return calls if len(calls) > 1 else None


def _custom_calls(text: str) -> list[tuple[str, dict]] | None:
    m = _FUNCTION_TAG.search(text)
    if m:
        try:
            return [(m.group("function_name"), json.loads(m.group("args").replace("'", '"')))]
        except json.JSONDecodeError:
            return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
        several = _json_call_sequence(text)
        if several is not None:
            return several
    if isinstance(obj, dict):
        is_call = obj.get("type") == "function" or "name" in obj
        if is_call and "name" in obj and "parameters" in obj:
            return [(obj["name"], obj["parameters"])]
        return None
    return _python_list_calls(text)


def parse_tool_calls(content: str, ipython: bool) -> list[tuple[str, dict]]:
    """Tool calls in a generated assistant text, as Meta's ``decode_assistant_message`` finds
    them; ``ipython`` says the text was inside ``<|python_start|>``. Meta keeps only the first
    call of a python list, and reads no call in several JSON objects one after the other (what an
    assistant turn with several calls encodes to); we keep them all."""
    custom = _custom_calls(content)
    if custom is not None:
        out = []
        for name, args in custom:
            # Built-in tools written in custom-tool syntax take their first argument as query.
            if name in BUILTIN_TOOLS and isinstance(args, dict) and args:
                args = {"query": list(args.values())[0]}
            out.append((name, args))
        return out
    m = _BUILTIN_CALL.search(content)
    if m:
        return [(m.group("tool_name"), {"query": m.group("query")})]
    if ipython:
        return [("code_interpreter", {"code": content})]
    return []


# How a conversation offers functions to the model (Llama 4 JSON tool calling): the schemas in the
# system message. SFT data (llama4/posttrain) and the server (llama4/server/tools.py) both use it.
TOOLS_PREAMBLE = ("You have access to the following functions. To call a function, reply with a JSON object "
                  '{"name": function name, "parameters": {argument: value}}.\n\n')


def with_tools(messages: Sequence[dict], tools: Sequence[dict] | None) -> list[dict]:
    """The messages with the function schemas written into the system message (a new one first
    when there is none), as Llama's JSON tool-calling prompt does."""
    messages = [dict(m) for m in messages]
    if not tools:
        return messages
    text = TOOLS_PREAMBLE + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if messages and messages[0]["role"] == "system":
        sys_content = messages[0].get("content") or ""
        if isinstance(sys_content, list):
            sys_content = "".join(p if isinstance(p, str) else p["text"] for p in sys_content)
        messages[0]["content"] = f"{sys_content}\n\n{text}" if sys_content else text
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages
