"""HTTP semantics of the OpenAI API: status codes, error bodies, server-sent events.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and
the message names the field. Bad input is a 4xx and touches nothing shared; an
embedding that vanished is a 503 the client may retry.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from router.images import ImageInputError
from router.schemas import ChatCompletionRequest
from router.service import ModelNotFound, RouterService
from runtime.messages import EmbeddingLostError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": status}})


def error_for(exc: BaseException) -> JSONResponse:
    if isinstance(exc, ModelNotFound):
        return error_response(404, str(exc), "model_not_found", "model")
    if isinstance(exc, ImageInputError):
        return error_response(400, str(exc), "invalid_request_error", exc.field)
    if isinstance(exc, EmbeddingLostError):
        return error_response(503, f"an image embedding was lost, please retry: {exc}", "unavailable")
    if isinstance(exc, ValueError):
        param = str(exc).split(":", 1)[0] if ":" in str(exc) else None
        return error_response(400, str(exc), "invalid_request_error", param)
    log.exception("internal error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return f"{field or 'body'}: {first.get('msg', 'invalid value')}", field


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", field)

    app.add_exception_handler(RequestValidationError, on_validation)


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def chat_completions(service: RouterService, body: ChatCompletionRequest):
    try:
        if not body.stream:
            return JSONResponse((await service.complete(body)).model_dump(exclude_none=True))
        chunks = await service.stream(body)
    except Exception as exc:  # noqa: BLE001: every failure becomes a typed HTTP error
        return error_for(exc)

    async def events():
        try:
            async for chunk in chunks:
                yield _sse(chunk.model_dump_json(exclude_none=True))
        except Exception as exc:  # noqa: BLE001: headers are gone; report in-band, as OpenAI does
            body = json.loads(error_for(exc).body)
            yield _sse(json.dumps(body))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def models(service: RouterService) -> dict:
    return {"object": "list", "data": [{"id": service.config.served_model_name, "object": "model",
                                        "owned_by": "splitserve", "root": service.config.model_id,
                                        "max_model_len": service.config.max_model_len}]}
