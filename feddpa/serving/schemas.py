"""HTTP request/response bodies (pydantic): our per-client API and the OpenAI-compatible subset."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from feddpa.core.config import WeightMode as Mode


def _encodable(text: str) -> str:
    """JSON can carry lone surrogates; pydantic's parser refuses some (a high one in a plain
    field) but lets others through (a low one inside a list), and a tokenizer then fails inside a
    batch shared with other requests. Refuse them here, as a 422 naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"text that cannot be encoded as unicode UTF-8 at position {err.start} "
            "(a lone surrogate)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Body):
    instruction: Text = Field(
        ..., min_length=1, description="the input; may end with an OPTIONS: block"
    )
    options: list[Text] | None = Field(
        None, min_length=2, description="answer options (else parsed from the OPTIONS: block)"
    )
    weighting: Mode | None = Field(None, description="override the run's weighting mode")


class Weights(BaseModel):
    global_adapter: float
    local_adapter: float


class PredictResponse(BaseModel):
    client_id: int
    choice: str
    options: list[str]
    probs: list[float]
    weights: Weights
    version: str = Field(..., description="committed training round served (global and local)")


class GenerateRequest(_Body):
    prompt: Text = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    weighting: Mode | None = None


class GenerateResponse(BaseModel):
    client_id: int
    text: str
    weights: Weights
    version: str


class ClientInfo(BaseModel):
    client_id: int
    model: str


class ClientsResponse(BaseModel):
    clients: list[ClientInfo]
    version: str
    model_kind: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="a last chunk with the usage, no choices")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # sampling knobs of OpenAI clients are accepted
    model: str = Field(..., min_length=1, description="the client id, e.g. 'client-3' or '3'")
    prompt: Text = Field(..., min_length=1)
    max_tokens: int | None = Field(16, ge=1, le=4096)
    n: int = Field(1, ge=1, le=1)
    stream: bool = Field(False, description="server-sent events (causal_lm runs only)")
    stream_options: StreamOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    n: int = Field(1, ge=1, le=1)
    stream: bool = Field(False, description="server-sent events (causal_lm runs only)")
    stream_options: StreamOptions | None = None


class ErrorBody(BaseModel):
    detail: str = Field(..., description="what went wrong, in a sentence")
    request_id: str = Field(..., description="also the X-Request-ID header; the log has it too")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidBody(BaseModel):
    """422: the fields at fault (the input is never echoed), or a sentence."""

    detail: list[FieldError] | str
    request_id: str


ERROR_RESPONSES: dict[int | str, dict] = {  # the OpenAPI entries of a route's error answers
    **{code: {"model": ErrorBody} for code in (401, 403, 404, 413, 429, 503, 504)},
    422: {"model": InvalidBody},
}


# --- OpenAI-compatible responses (the fields the `openai` package's types read) --------------------

FinishReason = Literal["stop", "length"]  # a stop token / max_tokens reached


class Usage(BaseModel):
    prompt_tokens: int = Field(
        ..., description="the prompt as the model reads it (run's tokenizer)"
    )
    completion_tokens: int = Field(
        ..., description="tokens generated (the stop token included), or the chosen option's"
    )
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(..., description="client-N: the name to pass as `model`")
    object: Literal["model"] = "model"
    created: int = Field(..., description="when this server started (unix seconds)")
    owned_by: str = "feddpa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
