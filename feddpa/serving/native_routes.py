"""The native routes: health, metrics, the client list, and a client's predict and generate."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feddpa.core.records import Example
from feddpa.serving import schemas as s
from feddpa.serving.engine import Request as EngineRequest
from feddpa.serving.engine import Result
from feddpa.serving.limits import check_text, new_tokens
from feddpa.serving.middleware import Owner, RequestId
from feddpa.serving.service import Service

router = APIRouter()


def weights(r: Result) -> s.Weights:
    return s.Weights(global_adapter=r.global_weight, local_adapter=r.local_weight)


@router.get("/healthz")
async def healthz(service: Service) -> dict:
    """ "ok", or "degraded" with the reason while a newer round fails to load (the previous
    round is still served, so the answer stays 200)."""
    info = await service.describe()
    health = {"status": "ok", "version": info["version"], "clients": len(info["clients"])}
    if info.get("problem"):
        health.update(status="degraded", reason=info["problem"])
    return health


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: Service) -> PlainTextResponse:
    registry = service.state.metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/clients", response_model=s.ClientsResponse)
async def clients(service: Service, owner: Owner) -> s.ClientsResponse:
    return await service.clients(owner)


@router.post(
    "/v1/clients/{client_id}/predict",
    response_model=s.PredictResponse,
    responses=s.ERROR_RESPONSES,
)
async def predict(
    client_id: int, body: s.PredictRequest, service: Service, owner: Owner, rid: RequestId
) -> s.PredictResponse:
    await service.open_client(owner, client_id)
    check_text("instruction", body.instruction, service.state.limits.max_prompt_chars)
    example = service.mc_example(body.instruction, body.options)
    r = await service.run(rid, EngineRequest(client_id, example, "predict", body.weighting))
    return s.PredictResponse(
        client_id=client_id,
        choice=r.choice,
        options=list(example.options),
        probs=r.probs,
        weights=weights(r),
        version=r.version,
    )


@router.post(
    "/v1/clients/{client_id}/generate",
    response_model=s.GenerateResponse,
    responses=s.ERROR_RESPONSES,
)
async def generate(
    client_id: int, body: s.GenerateRequest, service: Service, owner: Owner, rid: RequestId
) -> s.GenerateResponse:
    info = await service.open_client(owner, client_id)
    if info["kind"] != "causal_lm":
        raise HTTPException(422, "this run's model is multiple_choice: use /predict")
    limits = service.state.limits
    check_text("prompt", body.prompt, limits.max_prompt_chars)
    req = EngineRequest(
        client_id,
        Example(body.prompt, "", "request"),
        "generate",
        body.weighting,
        new_tokens(body.max_tokens, limits),
    )
    r = await service.run(rid, req)
    return s.GenerateResponse(
        client_id=client_id, text=r.text, weights=weights(r), version=r.version
    )
