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
from typing import Any

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
    if isinstance(obj, dict):
        is_call = obj.get("type") == "function" or "name" in obj
        if is_call and "name" in obj and "parameters" in obj:
            return [(obj["name"], obj["parameters"])]
        return None
    return _python_list_calls(text)


def parse_tool_calls(content: str, ipython: bool) -> list[tuple[str, dict]]:
    """Tool calls in a generated assistant text, as Meta's ``decode_assistant_message`` finds
    them; ``ipython`` says the text was inside ``<|python_start|>``. Meta keeps only the first
    call of a python list; we keep them all."""
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
