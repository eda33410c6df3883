"""OpenAI API schemas (the subset we serve), as pydantic models.

Requests validate types and ranges here; anything that fails becomes a 400 with an OpenAI-style
error body (``errors.py``). Unknown extra fields are ignored, as OpenAI clients send fields we do
not use; fields we cannot honour (penalties, ``best_of``, images on a text model) are rejected explicitly
rather than silently ignored. Tools follow OpenAI's shapes (``tools``, ``tool_choice``, assistant
``tool_calls``, ``tool`` messages with ``tool_call_id``); ``server/tools.py`` checks what depends on
more than one field and maps them onto Llama 4's tool format. The tokenizer routes (``/tokenize``,
``/detokenize``, ``/tokenizer_info``) follow vLLM's, which lm-eval's remote tokenizer reads.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator,
                      model_serializer, model_validator)


def _json_number(v):
    # JSON's types, as the OpenAPI schema states them: true is not the integer 1 and "5" is not 5,
    # while 2.0 is an integer (JSON Schema); pydantic's lax mode would coerce the first two
    if isinstance(v, (bool, str)):
        raise ValueError(f"expected a number, got {type(v).__name__}")
    return v


def _json_bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {type(v).__name__}")
    return v


JsonInt = Annotated[int, BeforeValidator(_json_number)]
JsonFloat = Annotated[float, BeforeValidator(_json_number)]
JsonBool = Annotated[bool, BeforeValidator(_json_bool)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ImageURL(_Req):
    url: str
    detail: str | None = None


class ImagePart(_Req):
    type: Literal["image_url", "image", "input_image"]
    image_url: Union[ImageURL, str, None] = None  # a base64 data: URL (nothing is fetched)


class FunctionCall(_Req):
    name: str
    arguments: str  # a JSON object, as text (checked in server/tools.py)


class ToolCall(_Req):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages only: the call this result answers


class FunctionDef(_Req):
    name: str = Field(min_length=1, max_length=64)  # the prompt holds it as JSON: any text will do
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: JsonBool | None = None


class Tool(_Req):
    type: Literal["function"]
    function: FunctionDef
    # the object as the client sent it: the prompt renders it verbatim (key order included), as
    # the SFT data renders its "tools"
    _raw: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data, handler):
        tool = handler(data)
        if isinstance(data, dict):
            tool._raw = data
        return tool

    @property
    def raw(self) -> dict:
        return self._raw or self.model_dump(exclude_none=True)


class FunctionName(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Req):
    include_usage: JsonBool = False


def _stop_list(v):
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if len(v) > 4:
        raise ValueError("at most 4 stop sequences")
    return v


class _Sampling(_Req):
    model: str
    # None: the server's default (the model's generation_config.json, else 1.0)
    # bounds before the validator, or pydantic writes an optional field's bounds into the schema as
    # "gt"/"le" (not JSON Schema) and schema-driven clients send values the server refuses
    temperature: Annotated[float, Field(ge=0.0, le=2.0), BeforeValidator(_json_number)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0), BeforeValidator(_json_number)] | None = None
    top_k: Annotated[int, Field(ge=0), BeforeValidator(_json_number)] | None = None  # extension (vLLM-style)
    n: JsonInt = Field(1, ge=1, le=16)
    stream: JsonBool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: JsonInt | None = None
    presence_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        _stop_list(v)
        return v

    @property
    def stop_strings(self) -> list[str]:
        return _stop_list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: JsonInt | None = None
    max_completion_tokens: JsonInt | None = None
    logprobs: JsonBool | None = None
    top_logprobs: JsonInt | None = None  # 0..20, needs logprobs=true (checked in app.py)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: JsonBool | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[JsonInt], list[list[JsonInt]]]
    max_tokens: JsonInt | None = 16  # 0 only with echo: score the prompt, generate nothing
    echo: JsonBool = False
    logprobs: JsonInt | None = None  # 0..5 top tokens per position (checked in app.py)
    suffix: str | None = None
    best_of: JsonInt | None = None


class TokenizeRequest(_Req):
    prompt: str
    add_special_tokens: JsonBool = True  # prepend <|begin_of_text|>, as a Hugging Face Llama tokenizer does
    return_token_strs: JsonBool = False


class DetokenizeRequest(_Req):
    tokens: list[JsonInt]


# --- responses -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _without_none(handler, obj, keys) -> dict:
    out = handler(obj)
    return {k: v for k, v in out.items() if not (k in keys and v is None)}


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _ser(self, handler):  # no "tool_calls" key on a reply without calls, as OpenAI's
        return _without_none(handler, self, ("tool_calls",))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for a prompt's first token (it has no context)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _ser(self, handler):
        return _without_none(handler, self, ("name", "arguments"))


class DeltaToolCall(BaseModel):
    """One piece of a streamed call: the first carries index, id, type and the name; the
    next ones the index and pieces of the arguments (OpenAI's stream)."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _ser(self, handler):
        return _without_none(handler, self, ("id", "type"))


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _ser(self, handler):
        return _without_none(handler, self, ("tool_calls",))


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama4"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
