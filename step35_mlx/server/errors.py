"""API errors in each API's own JSON shape (OpenAI and Anthropic), and which exceptions are the client's fault."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

log = logging.getLogger("step35_mlx.server")

ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


# ---------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


_ANTHROPIC_KIND = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   500: "api_error", 503: "overloaded_error"}
_OPENAI_KIND = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def _is_anthropic(request: Request) -> bool:
    return request.url.path.rstrip("/") in ANTHROPIC_PATHS


def error_response(request: Request, err: APIError) -> JSONResponse:
    if _is_anthropic(request):
        kind = err.kind if err.kind in _ANTHROPIC_KIND.values() else _ANTHROPIC_KIND.get(err.status, "api_error")
        body: dict = {"type": "error", "error": {"type": kind, "message": err.message}}
    else:
        kind = err.kind if err.kind in _OPENAI_KIND.values() else _OPENAI_KIND.get(err.status, "server_error")
        body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status)


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


def as_api_error(e: BaseException) -> APIError:
    """Our ``ValueError`` messages and template errors are the request's fault and say what to fix;
    anything else is logged here and answered without its internal text."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError) or type(e).__module__.startswith("jinja2"):
        return APIError(400, str(e))
    log.error("request failed", exc_info=(type(e), e, e.__traceback__))
    if isinstance(e, TypeError):
        return APIError(400, "the request holds a value of a type the server cannot use")
    return APIError(500, "generation failed with an internal error (logged by the server)", kind="server_error")
