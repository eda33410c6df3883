"""Tool calling over the chat API: OpenAI's ``tools`` / ``tool_choice`` / ``tool_calls`` / ``tool``
messages, mapped onto Llama 4's JSON tool format.

Prompt. The function schemas are written into the system message exactly as SFT data renders its
``"tools"`` (:func:`llama4.tokenizer.tool_calls.with_tools`, each object verbatim as the client sent
it), so a model taught with ``llama4 sft`` on tool conversations is served the prompt it learned.
Calls in the history are encoded by the chat format (``encode_tool_call``, ``json`` format:
``{"type": "function", "name": ..., "parameters": {...}}`` closed by ``<|eom|>``); results are
``ipython`` turns. Meta's format carries no call ids: results are read in message order.

Reply. A reply is a tool-call reply when its text (leading whitespace aside) begins with a call in
a syntax :func:`~llama4.tokenizer.tool_calls.parse_tool_calls` reads (JSON object(s), a python list
``[f(a=1)]``, ``<function=f>{...}</function>``, ``<|python_start|>`` code for a declared
``code_interpreter``, ``NAME.call(query=...)`` for a declared built-in), the whole text parses, and
every call names a declared function with object arguments; any other text is ``content``. A
stream holds its text back only while it can still begin a call, so streamed and collected
replies carry the same calls (a call is sent when it is complete: one chunk with index, id, type
and name, then its arguments).

``tool_choice``: ``"auto"`` (the default with tools): the model decides. ``"none"``: the tools are
left out of the prompt and replies are not parsed (nothing offers the model a call, and no call is
returned; vLLM's ``--exclude-tools-when-tool-choice-none``). ``"required"`` / a named function:
the server writes the opening of a call into the assistant turn before the model continues
(``{"type": "function", "name": "`` / ``{"type": "function", "name": "NAME", "parameters":``), so
the reply begins with a call; the model writes the rest. There is no constrained decoding: when
what it writes does not complete a valid call of a declared function, the reply is returned as
``content`` (the opening included) with its own finish reason, never as a made-up call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from llama4.tokenizer.tool_calls import with_tools
from llama4.server import protocol as P
from llama4.server.errors import APIError
from llama4.tokenizer.tool_calls import BUILTIN_TOOLS, parse_tool_calls

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_CALL_STARTS = ("{", "[", "<function=")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What a request's tools mean for its prompt and its replies."""

    schemas: list[dict] = field(default_factory=list)  # rendered into the system message
    names: frozenset[str] = frozenset()  # declared functions: the calls a reply may make
    parse: bool = False  # look for calls in replies
    prefill: str = ""  # assistant text the server writes before the model continues
    parallel: bool = True  # False: at most one call per reply (the first)

    def render(self, dialog: list[dict]) -> list[dict]:
        return with_tools(dialog, self.schemas)

    def _starts(self) -> tuple[str, ...]:
        extra = tuple(f"{n}.call(" for n in self.names if n in BUILTIN_TOOLS)
        return _CALL_STARTS + ((PYTHON_START,) if "code_interpreter" in self.names else ()) + extra

    def may_begin_call(self, text: str) -> bool:
        """Whether a reply beginning with ``text`` can still turn out to be a call."""
        s = text.lstrip()
        return any(s.startswith(st) or st.startswith(s) for st in self._starts())

    def calls(self, text: str) -> list[P.ResponseToolCall]:
        """The calls of a whole reply's text; [] when it is not a tool-call reply."""
        s = text.strip()
        if not self.parse or not any(s.startswith(st) for st in self._starts()):
            return []
        ipython = s.startswith(PYTHON_START)
        if ipython:
            s = s[len(PYTHON_START):].replace(PYTHON_END, "")
        found = parse_tool_calls(s, ipython)
        if not found or any(name not in self.names or not isinstance(args, dict) for name, args in found):
            return []
        if not self.parallel:
            found = found[:1]
        return [P.ResponseToolCall(id=new_call_id(), function=P.FunctionCall(
            name=name, arguments=json.dumps(args, ensure_ascii=False))) for name, args in found]

    def reply(self, generated: str) -> tuple[str | None, list[P.ResponseToolCall]]:
        """(content, calls) of a collected reply: content is None when there are calls."""
        text = self.prefill + generated
        calls = self.calls(text)
        return (None, calls) if calls else (text, [])


class CallStream:
    """One streamed choice: passes text through as content unless it may begin a call, in which
    case it is held until it no longer can or the reply ends."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.held, self.open = plan, plan.prefill, plan.parse

    def push(self, delta: str) -> str:
        if not self.open:
            return delta
        self.held += delta
        if self.plan.may_begin_call(self.held):
            return ""
        self.open, out, self.held = False, self.held, ""
        return out

    def finish(self) -> tuple[str, list[P.ResponseToolCall]]:
        """(content still to send, calls) at the end of the reply."""
        text, self.held = self.held, ""
        calls = self.plan.calls(text) if self.open else []
        return ("", calls) if calls else (text, [])


def plan_tools(req: P.ChatCompletionRequest) -> ToolPlan:
    """The request's tools and tool_choice, checked (a 400 names the field)."""
    tools, choice = req.tools or [], req.tool_choice
    names: list[str] = [t.function.name for t in tools]
    for j, name in enumerate(names):
        if name in names[:j]:
            raise APIError(400, f"Invalid 'tools.{j}.function.name': the function {name!r} is declared twice.",
                           f"tools.{j}.function.name", "invalid_value")
    if choice == "none":
        return ToolPlan()
    forced = choice == "required" or isinstance(choice, P.NamedToolChoice)
    if forced and not tools:
        raise APIError(400, "Invalid 'tool_choice': it requires a tool call but 'tools' is empty or missing.",
                       "tool_choice", "invalid_value")
    if isinstance(choice, P.NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"Invalid 'tool_choice': the function {choice.function.name!r} is not among "
                       f"'tools' ({', '.join(names)}).", "tool_choice", "invalid_value")
    if not tools:
        return ToolPlan()
    prefill = ""
    if choice == "required":
        prefill = '{"type": "function", "name": "'
    elif isinstance(choice, P.NamedToolChoice):
        # ends at the colon, where the tokenizer's pre-split would cut anyway (" {" starts a token)
        prefill = f'{{"type": "function", "name": {json.dumps(choice.function.name)}, "parameters":'
    return ToolPlan([t.raw for t in tools], frozenset(names), True, prefill, req.parallel_tool_calls is not False)


def check_messages(messages: list[P.ChatMessage]) -> None:
    """Tool fields where they belong: ``tool_calls`` (arguments a JSON object) only on assistant
    messages; ``tool`` messages with content and a ``tool_call_id`` answering a call of the
    assistant message they follow (other tool messages between them allowed)."""
    open_calls: set[str] | None = None  # ids of the calls that tool messages may answer now
    for i, m in enumerate(messages):
        if m.tool_calls is not None and m.role != "assistant":
            raise APIError(400, f"Invalid 'messages.{i}.tool_calls': only assistant messages carry tool calls "
                           f"(this one is {m.role!r}).", f"messages.{i}.tool_calls", "invalid_value")
        if m.tool_call_id is not None and m.role != "tool":
            raise APIError(400, f"Invalid 'messages.{i}.tool_call_id': only tool messages answer a tool call "
                           f"(this one is {m.role!r}).", f"messages.{i}.tool_call_id", "invalid_value")
        if m.role == "assistant":
            for j, tc in enumerate(m.tool_calls or []):
                param = f"messages.{i}.tool_calls.{j}.function.arguments"
                try:
                    args = json.loads(tc.function.arguments)
                except json.JSONDecodeError as e:
                    raise APIError(400, f"Invalid '{param}': not valid JSON ({e.msg}).", param,
                                   "invalid_value") from None
                if not isinstance(args, dict):
                    raise APIError(400, f"Invalid '{param}': must be a JSON object, got {type(args).__name__}.",
                                   param, "invalid_value")
            open_calls = {tc.id for tc in m.tool_calls} if m.tool_calls else None
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"Missing required parameter: 'messages.{i}.tool_call_id' (a tool message "
                               "names the call it answers).", f"messages.{i}.tool_call_id",
                               "missing_required_parameter")
            if m.content is None:
                raise APIError(400, f"Missing required parameter: 'messages.{i}.content' (the tool's result).",
                               f"messages.{i}.content", "missing_required_parameter")
            if open_calls is None:
                raise APIError(400, f"Invalid 'messages.{i}.role': a 'tool' message must answer a preceding "
                               "assistant message with 'tool_calls'.", f"messages.{i}.role", "invalid_value")
            if m.tool_call_id not in open_calls:
                raise APIError(400, f"Invalid 'messages.{i}.tool_call_id': {m.tool_call_id!r} is not the id of a "
                               f"call of the preceding assistant message ({', '.join(sorted(open_calls))}).",
                               f"messages.{i}.tool_call_id", "invalid_value")
        else:
            open_calls = None
