"""OpenAI API schemas (the subset we serve), as pydantic models.

Requests validate types and ranges here; anything that fails becomes a 400 with an OpenAI-style
error body (``errors.py``). Unknown extra fields are ignored, as OpenAI clients send fields we do
not use; fields we cannot honour (``tools``, penalties, ``best_of``, images on a text model) are
rejected explicitly rather than silently ignored. The tokenizer routes (``/tokenize``,
``/detokenize``, ``/tokenizer_info``) follow vLLM's, which lm-eval's remote tokenizer reads.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


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


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    name: str | None = None


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
    temperature: JsonFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: JsonFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: JsonInt | None = Field(None, ge=0)  # extension (vLLM-style)
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
    tools: list | None = None


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


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
