"""The HTTP front door of a deployment: OpenAI's API, MII's RESTful API, OpenAI's Batch API.

A gateway is one more client of the deployment's Redis, stateless: any number of gateway
processes on any hosts serve one deployment, and a restart loses nothing (requests, their
tokens and bulk jobs live in Redis). Chat templates are applied by the workers, so a
gateway host needs no model files.

    mii gateway smollm2-mii-deployment --port 8000 --api-key sk-...    # a process
    mii.serve("smollm2", enable_restful_api=True, restful_api_port=8000)  # beside the workers
    create_app(GatewaySettings(deployment=...))                         # an ASGI app

Routes (`mii.gateway.app.create_app` lists them): `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/v1/files`, `/v1/batches`, `POST
/mii/{deployment}`, `/healthz`, `/health`, `/metrics`.

Libraries, and why:
- Starlette (ASGI toolkit) rather than FastAPI on top of it: the request and response
  shapes are OpenAI's, fixed and documented there, and errors must be OpenAI's bodies and
  status codes (400 naming the parameter, never FastAPI's 422); pydantic validates bodies
  here directly, and a request crosses fewer layers (the gateway's added latency is a
  target). Starlette is small, async end to end, and what FastAPI runs on.
- uvicorn: the standard ASGI server (uvloop and httptools when installed).
- Server-sent events are written here (`data: {...}\\n\\n`, then `data: [DONE]`): a few
  lines, so no SSE package.
- prometheus_client: the exposition format every scraper reads.
- python-multipart: what Starlette parses `multipart/form-data` (file uploads) with.
"""
