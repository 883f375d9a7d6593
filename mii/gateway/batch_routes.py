"""HTTP routes of OpenAI's Files and Batch APIs (`mii.gateway.batches` does the work, in
threads: bulk jobs speak blocking Redis)."""

from __future__ import annotations

from anyio.to_thread import run_sync
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mii.gateway.batches import parse_result_file_id
from mii.gateway.errors import bad_request
from mii.gateway.files import FileMeta, new_file
from mii.gateway.requests import json_body

MAX_LIST = 100


def _gateway(request: Request):
    return request.app.state.gateway


async def upload_file(request: Request) -> Response:
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise bad_request("a multipart field 'file' is required", "file")
    if purpose != "batch":
        raise bad_request("only purpose 'batch' is supported", "purpose")
    content = await upload.read()
    meta = new_file(upload.filename or "input.jsonl", len(content))
    await run_sync(_gateway(request).files.put, meta, content)
    return JSONResponse(meta.as_dict())


async def get_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]
    rendered = parse_result_file_id(file_id)
    if rendered is None:
        meta = await run_sync(_gateway(request).files.meta, file_id)
        return JSONResponse(meta.as_dict())
    content = await run_sync(_gateway(request).batches.result_file, *rendered)
    meta = FileMeta(file_id, len(content), 0, f"{file_id}.jsonl", purpose="batch_output")
    return JSONResponse(meta.as_dict())


async def file_content(request: Request) -> Response:
    gateway, file_id = _gateway(request), request.path_params["file_id"]
    rendered = parse_result_file_id(file_id)
    if rendered is None:
        content = await run_sync(gateway.files.content, file_id)
    else:
        content = await run_sync(gateway.batches.result_file, *rendered)
    return Response(content, media_type="application/jsonl")


async def delete_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]
    deleted = await run_sync(_gateway(request).files.delete, file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": deleted})


async def create_batch(request: Request) -> Response:
    body = json_body(await request.body())
    return JSONResponse(await run_sync(_gateway(request).batches.create, body))


async def get_batch(request: Request) -> Response:
    batch_id = request.path_params["batch_id"]
    return JSONResponse(await run_sync(_gateway(request).batches.get, batch_id))


async def cancel_batch(request: Request) -> Response:
    batch_id = request.path_params["batch_id"]
    return JSONResponse(await run_sync(_gateway(request).batches.cancel, batch_id))


async def list_batches(request: Request) -> Response:
    try:
        limit = int(request.query_params.get("limit", 20))
    except ValueError:
        raise bad_request("limit must be an integer", "limit") from None
    if not 1 <= limit <= MAX_LIST:
        raise bad_request(f"limit must be from 1 to {MAX_LIST}", "limit")
    after = request.query_params.get("after")
    return JSONResponse(await run_sync(_gateway(request).batches.list, limit, after))


ROUTES = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
]
