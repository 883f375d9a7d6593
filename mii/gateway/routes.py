"""The gateway's generation and operations routes (the Batch API's are in `batch_routes`).

Handlers raise; `mii.gateway.app` turns what they raise into OpenAI's error bodies.
"""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mii.gateway.errors import bad_request, not_found
from mii.gateway.generate import answer, unless_disconnected
from mii.gateway.metrics import Timing
from mii.gateway.requests import json_body, parse_chat, parse_completion
from mii.producer.submit import as_prompt_list


def _state(request: Request):
    return request.app.state.gateway


async def completions(request: Request) -> Response:
    gateway = _state(request)
    parsed = parse_completion(json_body(await request.body()))
    return await answer(gateway.deployment, parsed, gateway.metrics, request)


async def chat_completions(request: Request) -> Response:
    gateway = _state(request)
    parsed = parse_chat(json_body(await request.body()))
    return await answer(gateway.deployment, parsed, gateway.metrics, request)


async def list_models(request: Request) -> Response:
    card = _state(request).deployment.model_card()
    return JSONResponse({"object": "list", "data": [card]})


async def get_model(request: Request) -> Response:
    deployment = _state(request).deployment
    deployment.check_model(request.path_params["model"])
    return JSONResponse(deployment.model_card())


async def mii_generate(request: Request) -> Response:
    """DeepSpeed-MII's RESTful API: `{"prompts": ..., <generate options>}` ->
    `[Response.to_msg_dict(), ...]`."""
    gateway = _state(request)
    deployment = gateway.deployment
    if request.path_params["deployment"] != deployment.name:
        raise not_found(f"no deployment {request.path_params['deployment']!r} here")
    body = json_body(await request.body())
    if "prompts" not in body:
        raise bad_request('the body needs "prompts": a text or a list of texts', "prompts")
    prompts = as_prompt_list(body.pop("prompts"))
    await deployment.require_live_worker()
    body.setdefault("timeout", deployment.timeout_s)
    timing = Timing(gateway.metrics, "/mii")
    responses = await unless_disconnected(request, deployment.client.agenerate(prompts, **body))
    timing.done(sum(r.prompt_length for r in responses), sum(r.generated_length for r in responses))
    return JSONResponse([r.to_msg_dict() for r in responses])


async def healthz(request: Request) -> Response:
    """MII's liveness route: the gateway answers."""
    return PlainTextResponse("ok")


async def health(request: Request) -> Response:
    """200 while at least one worker of the deployment is live, else 503."""
    live = await _state(request).deployment.live_workers(fresh=True)
    body = {"status": "ok" if live else "no live worker", "live_workers": live}
    return JSONResponse(body, status_code=200 if live else 503)


async def metrics(request: Request) -> Response:
    gateway = _state(request)
    depths = await anyio.to_thread.run_sync(gateway.deployment.queue_depths)
    live = await gateway.deployment.live_workers()
    text = gateway.metrics.exposition(depths, live)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/mii/{deployment:path}", mii_generate, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
