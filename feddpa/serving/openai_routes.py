"""The OpenAI-compatible routes: a completion or chat completion by a client (the `model`, e.g.
`client-3`) and the model list. Their bodies and stream chunks are `openai_compat`'s."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response, StreamingResponse

from feddpa.serving import schemas as s
from feddpa.serving.middleware import Owner, RequestId
from feddpa.serving.openai_compat import STREAM_CONTENT, Chunks, chat_body, completion_body
from feddpa.serving.service import Service

router = APIRouter()


def parse_client(text: str) -> int:
    """'3', 'client-3' or 'client_00003' -> 3."""
    digits = text.removeprefix("client").lstrip("-_")
    # isdigit() alone admits '²' and ids past int()'s 4300-digit limit: both made int() raise (500)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise HTTPException(404, f"unknown client {text!r}: use an id from GET /v1/clients")
    return int(digits)


def chunks_for(body: s.CompletionRequest | s.ChatCompletionRequest, chat: bool) -> Chunks | None:
    if not body.stream:
        return None
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return Chunks(body.model, chat, include_usage)


@router.post(
    "/v1/completions",
    response_model=s.CompletionResponse,
    responses={**s.ERROR_RESPONSES, 200: STREAM_CONTENT},
)
async def completions(
    body: s.CompletionRequest, service: Service, owner: Owner, rid: RequestId
) -> s.CompletionResponse | Response:
    r = await service.complete(
        rid,
        owner,
        parse_client(body.model),
        body.prompt,
        body.max_tokens,
        "prompt",
        chunks_for(body, chat=False),
    )
    return r if isinstance(r, StreamingResponse) else completion_body(body.model, r)


@router.post(
    "/v1/chat/completions",
    response_model=s.ChatCompletionResponse,
    responses={**s.ERROR_RESPONSES, 200: STREAM_CONTENT},
)
async def chat(
    body: s.ChatCompletionRequest, service: Service, owner: Owner, rid: RequestId
) -> s.ChatCompletionResponse | Response:
    limit = service.state.limits.max_messages
    if len(body.messages) > limit:
        raise HTTPException(413, f"messages has {len(body.messages)} entries; the limit is {limit}")
    prompt = "\n\n".join(
        m.content for m in body.messages if m.role in ("system", "developer", "user")
    )
    if not prompt.strip():
        raise HTTPException(422, "messages: at least one non-empty user message is required")
    r = await service.complete(
        rid,
        owner,
        parse_client(body.model),
        prompt,
        body.max_completion_tokens or body.max_tokens,
        "messages",
        chunks_for(body, chat=True),
    )
    return r if isinstance(r, StreamingResponse) else chat_body(body.model, r)


@router.get("/v1/models", response_model=s.ModelList, responses=s.ERROR_RESPONSES)
async def models(service: Service, owner: Owner) -> s.ModelList:
    listed = await service.clients(owner)
    cards = [s.ModelCard(id=c.model, created=service.started) for c in listed.clients]
    return s.ModelList(data=cards)
