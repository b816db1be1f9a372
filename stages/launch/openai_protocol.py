"""The OpenAI API's request bodies and error bodies, as `vllm serve` takes them.

Every request field is checked here (type, range, finite numbers), so a bad request gets a 400 whose message
names the field, in OpenAI's error body `{"error": {"message", "type", "param", "code"}}`. Fields the OpenAI
API defines that this server does not implement (tools, response_format, logit_bias, ...) are refused by name
rather than ignored; any other unknown field is refused too.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs

# fields of the OpenAI API this server refuses, with why
NOT_IMPLEMENTED = {
    "response_format": "structured output",
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "parallel_tool_calls": "tool calling",
    "logit_bias": "logit bias",
    "suffix": "suffix insertion",
    "best_of": "best_of",
    "audio": "audio output",
    "modalities": "other modalities",
    "prediction": "predicted outputs",
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
}

Finite = Annotated[float, Field(allow_inf_nan=False)]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.status)


def error_body(message: str, kind: str, param: str | None, code: int | None) -> dict:
    return {"error": {"message": " ".join(str(message).split()), "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(BaseModel):
    """The fields both endpoints share; None means "not given" (the model's generation_config.json, else
    OpenAI's default, fills it)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Finite | None = Field(None, ge=0, le=1)
    repetition_penalty: Finite | None = Field(None, gt=0, le=10)
    presence_penalty: Finite | None = Field(None, ge=-2, le=2)
    frequency_penalty: Finite | None = Field(None, ge=-2, le=2)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as vLLM's
    stop: str | list[str] | None = None
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("an empty stop string would stop at once; drop it")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        # refuse_unimplemented catches a JSON number; this, what pydantic coerces ("1", true) to one
        if v:
            raise ValueError("not supported by this server; send 0 or leave it out")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: StrictInt | None = Field(None, ge=1, le=1)  # more than 1 is refused by name (refuse_unimplemented)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


def refuse_unimplemented(body: Any) -> None:
    """A 400 naming the first field this server does not implement (given and not null/false/empty)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    for key, what in NOT_IMPLEMENTED.items():
        value = body.get(key)
        if value is None or value is False or value == [] or value == {}:
            continue
        if key == "best_of" and value == 1:
            continue
        raise ApiError(400, f"{key} is not supported by this server ({what}); remove it from the request", key)
    for key in ("presence_penalty", "frequency_penalty"):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != 0:
            raise ApiError(400, f"{key}={value} is not supported by this server; send 0 or leave it out", key)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(one-line message naming the field, param) from pydantic's errors (the first one)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # union members appear as type names in the location: keep the field path only
    path = [x for x in loc if not _is_type_tag(x)]
    param = ".".join(path) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this server does not take it; remove it", param
    if kind == "missing":
        return f"{param} is required", param
    value = e.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    msg = e.get("msg", "invalid").removeprefix("Value error, ")
    if param is None:
        return f"invalid request body: {msg}", None
    return f"{param}={shown}: {msg}", param


def _is_type_tag(x: str) -> bool:
    return x in {"str", "int", "float", "bool", "list", "dict"} or x.startswith(("list[", "function-", "constrained-"))
