"""Bodies of the OpenAI-compatible routes: whole responses and the chunks of a streamed one.

A stream is server-sent events as the OpenAI API sends them: one `data: {chunk}` event per text
delta, a last chunk carrying the finish reason, with `stream_options.include_usage` one more chunk
with no choices and the usage, then `data: [DONE]`. Completion chunks are `text_completion`
objects; chat chunks are `chat.completion.chunk` objects whose `choices[0].delta` holds the text
(the first one the role). All chunks of one stream share its id and creation time.
"""

from __future__ import annotations

import json
import time
import uuid

from feddpa.serving import schemas as s
from feddpa.serving.engine import Result

DONE = "data: [DONE]\n\n"
STREAM_CONTENT: dict = {  # the OpenAPI entry of a 200 that may be an event stream
    "description": "the completion; with `stream: true`, server-sent events (`data: {chunk}` "
    "per text delta, then `data: [DONE]`)",
    "content": {
        "text/event-stream": {
            "schema": {  # one event: its data is a JSON chunk, an error, or [DONE]
                "type": "object",
                "properties": {"data": {"type": "string"}},
                "required": ["data"],
            }
        }
    },
}


def event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def stream_error(request_id: str, status: int, message: str) -> dict:
    """An error after the stream started (the status line is sent): the openai client raises it
    as an APIError with this body."""
    return {"error": {"message": message, "code": status, "request_id": request_id}}


def usage(result: Result) -> s.Usage:
    """Token counts from the run's tokenizer (see `Result`)."""
    return s.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def _answer(result: Result) -> tuple[str, s.FinishReason]:
    """The generated text (causal_lm) or the chosen option (multiple_choice), and why it ended."""
    reason: s.FinishReason = "length" if result.finish_reason == "length" else "stop"
    return result.text or result.choice, reason


def completion_body(model: str, result: Result) -> s.CompletionResponse:
    text, reason = _answer(result)
    return s.CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[s.CompletionChoice(text=text, finish_reason=reason)],
        usage=usage(result),
    )


def chat_body(model: str, result: Result) -> s.ChatCompletionResponse:
    text, reason = _answer(result)
    return s.ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[s.ChatChoice(message=s.AssistantMessage(content=text), finish_reason=reason)],
        usage=usage(result),
    )


class Chunks:
    """The chunks of one streamed completion (`chat` False) or chat completion (True)."""

    def __init__(self, model: str, chat: bool, include_usage: bool = False) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict]) -> dict:
        body: dict = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null until the last chunk
        return body

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return choice

    def start(self) -> list[dict]:
        """A chat stream opens with the role (and empty content), as OpenAI's does."""
        return [self._chunk([self._choice("", None, role=True)])] if self.chat else []

    def delta(self, text: str) -> dict:
        return self._chunk([self._choice(text, None)])

    def finish(self, result: Result) -> list[dict]:
        last = [self._chunk([self._choice(None if self.chat else "", result.finish_reason)])]
        if self.include_usage:
            last.append({**self._chunk([]), "usage": usage(result).model_dump()})
        return last
