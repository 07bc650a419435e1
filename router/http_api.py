"""HTTP semantics of the OpenAI API: status codes, error bodies, server-sent events.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and
the message names the field. Only bad input is a 4xx, and it touches nothing shared: an
oversized body is refused (413) before the app parses it, a body that is not JSON
is a 415 or a 400, every schema error a 400. A service that cannot answer now (a
replica died, an embedding vanished) is a 503 the client may retry, an app whose
start-up failed a 503 saying why; any other fault a 500 with its message. Once a
stream has started, the error arrives in-band as the last event before `[DONE]`.
"""

from __future__ import annotations

import json
import logging
from email.message import Message

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from router.schemas import ChatCompletionRequest
from router.service import ModelNotFound, RouterService, ServiceUnavailable, StartupFailed
from runtime.messages import EmbeddingLostError, RequestError

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": status}})


def error_for(exc: BaseException) -> JSONResponse:
    """The HTTP answer to an exception: 4xx only for what the client sent (`RequestError`,
    schema errors, an unknown model); 503 for what may pass; anything else is a 500 with
    its message, `ValueError`s raised inside a service included."""
    if isinstance(exc, ModelNotFound):
        return error_response(404, str(exc), "model_not_found", "model")
    if isinstance(exc, RequestError):
        field = getattr(exc, "field", None) or (str(exc).split(":", 1)[0] if ":" in str(exc) else None)
        return error_response(400, str(exc), "invalid_request_error", field)
    if isinstance(exc, ValidationError):  # a handle caller's dict that is not a valid request
        message, field = _validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", field)
    if isinstance(exc, EmbeddingLostError):
        return error_response(503, f"an image embedding was lost, please retry: {exc}", "unavailable")
    if isinstance(exc, StartupFailed):
        return error_response(503, f"not ready: {exc}", "startup_failed")
    if isinstance(exc, ServiceUnavailable):
        return error_response(503, f"{exc}; please retry", "unavailable")
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def _field_path(location: tuple) -> str | None:
    """`messages.0.content.0.image_url.url` from pydantic's location, which also names the
    union members it tried (`str`, `list[tagged-union[...]]`) and repeats a tagged member's tag."""
    parts: list[str] = []
    for part in map(str, location[1:] if location[:1] == ("body",) else location):
        if "[" in part or part in ("str", "int", "float", "bool", "none"):
            continue  # a union member's label, not a field
        if parts and part == parts[-1]:
            continue  # a tagged union's tag, then the field of the same name
        parts.append(part)
    return ".".join(parts) or None


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    # The deepest error is the most specific (a union also reports the members that failed).
    errors = sorted(errors, key=lambda e: len(e.get("loc", ())), reverse=True)
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    field = _field_path(tuple(first.get("loc", ())))
    return f"{field or 'body'}: {first.get('msg', 'invalid value')}", field


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.method == "POST" and not _is_json(request.headers.get("content-type")):
            # FastAPI hands a non-JSON body to the schema as bytes; say what is really wrong.
            return error_response(415, "the request body must be JSON, sent with Content-Type: "
                                       "application/json", "invalid_request_error")
        message, field = _validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", field)

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown paths (404), wrong methods (405), bodies FastAPI cannot parse (400).
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        response = error_response(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})
        return response

    async def on_anything_else(request: Request, exc: Exception) -> JSONResponse:
        # An endpoint that let an exception out: still the JSON shape, never text/plain.
        return error_for(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_anything_else)


class BodySizeLimit:
    """ASGI middleware: refuses a request body over the app's `state.max_request_bytes` with a
    413 JSON error, from its Content-Length before reading anything, or as soon as the bytes
    streamed in (chunked uploads) pass the bound. A body within the bound is read whole and
    replayed to the app, which parses all of it anyway."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(limit, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what follows the body: the client's disconnect

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send) -> None:
        response = error_response(413, f"the request body is larger than {limit} bytes "
                                       "(max_request_bytes)", "invalid_request_error")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


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
