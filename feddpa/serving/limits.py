"""Serving limits: what one request may cost. Every field is a `feddpa serve` flag (`--max-options`,
...; the help text is the field's `doc`), and the README lists the defaults.

A request over a size limit gets 413 naming the field and the limit; `max_tokens` over the limit
is a 422 (a bad value, as OpenAI's API answers); too many requests in flight give 503 (service
queue) or 429 (one client's share), both with Retry-After; a request that runs past the timeout
gets 504 with Retry-After; a body not received within `body_timeout_s` gets 408, and a client
token with `max_token_connections` requests open (their bodies still arriving included) gets 429
before its next body is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fastapi import HTTPException


def _limit(default: float, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = _limit(1 << 20, "request body size; 413 before the body is parsed")
    body_timeout_s: float = _limit(10.0, "seconds to receive a request body before 408")
    max_prompt_chars: int = _limit(8000, "characters of an instruction, prompt or chat")
    max_options: int = _limit(32, "answer options per request")
    max_option_chars: int = _limit(500, "characters of one option")
    max_messages: int = _limit(64, "messages per chat completion")
    max_prompt_tokens: int = _limit(1024, "tokens of the prompt (the model's tokenizer)")
    max_new_tokens: int = _limit(256, "largest max_tokens a request may ask for")
    max_beams: int = _limit(4, "beams of generation (the run's eval.num_beams, capped)")
    max_queue: int = _limit(256, "requests in flight per ingress replica before 503")
    max_client_inflight: int = _limit(32, "requests in flight per client before 429")
    max_token_connections: int = _limit(
        64, "requests open per client token, body upload included, before 429"
    )
    request_timeout_s: float = _limit(60.0, "seconds a request may run before 504")
    retry_after_s: int = _limit(1, "Retry-After of 429 / 503 / 504 answers")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"serving limit {f.name} must be > 0, got {value!r}")

    def retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


def too_large(what: str, size: int, limit: int, unit: str = "characters") -> HTTPException:
    return HTTPException(413, f"{what} has {size} {unit}; the limit is {limit}")


def check_text(what: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise too_large(what, len(text), limit)


def check_options(options: list[str], limits: Limits) -> None:
    if len(options) > limits.max_options:
        raise too_large("options", len(options), limits.max_options, "entries")
    for i, opt in enumerate(options):
        check_text(f"options[{i}]", opt, limits.max_option_chars)


def new_tokens(max_tokens: int | None, limits: Limits) -> int | None:
    """The request's decoding bound, refused (422) above the server's limit."""
    if max_tokens is not None and max_tokens > limits.max_new_tokens:
        raise HTTPException(
            422, f"max_tokens {max_tokens} is over this server's limit of {limits.max_new_tokens}"
        )
    return max_tokens
