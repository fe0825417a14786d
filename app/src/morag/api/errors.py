"""Error bodies: ``{"detail": str, "code": str}`` on the native API, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1/`` (what its SDKs parse)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_PREFIX = "/v1/"

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_type",
    422: "invalid_input",
    429: "rate_limited",
    503: "unavailable",
    504: "timeout",
}

# OpenAI's error ``type`` by status (its SDKs map the status to an exception class).
OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class ApiError(HTTPException):
    """An HTTPException with a machine-readable ``code`` (default: from the status)."""

    def __init__(
        self,
        status: int,
        detail: str,
        code: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, detail, headers=headers)
        self.code = code or code_for(status)
        self.param = param


def code_for(status: int) -> str:
    if status in CODES:
        return CODES[status]
    return "internal_error" if status >= 500 else "bad_request"


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "url") -> "url"; ("query", "gpu") -> "gpu": the name the client sent.
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts)


def validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]], str]:
    problems = []
    for err in exc.errors():
        problems.append(
            {
                "field": _field(err.get("loc", ())),
                "where": str((err.get("loc") or ["?"])[0]),
                "message": str(err.get("msg", "invalid")),
            }
        )
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
    first = problems[0]["field"] if problems else ""
    return text, problems, first


def openai_body(status: int, message: str, code: str, param: str | None) -> dict[str, Any]:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def error_response(
    request: Request,
    status: int,
    detail: str,
    code: str,
    *,
    param: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if _is_openai(request):
        if status in (415, 422):
            # OpenAI answers every invalid request 400; its SDKs raise BadRequestError.
            status = 400
        body = openai_body(status, detail, code, param)
    else:
        body = {"detail": detail, "code": code}
        if errors:
            body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers that give every error its ``code``."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = getattr(exc, "code", None) or code_for(status)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 400 and not _is_openai(request):
            # FastAPI's "error parsing the body" (undecodable JSON or form): bad input is a
            # 422 on the native API, like every other invalid request.
            status, code = 422, "invalid_input"
            detail = f"the request body cannot be parsed: {detail}"
        return error_response(
            request,
            status,
            detail,
            code,
            param=getattr(exc, "param", None),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        text, problems, first = validation_detail(exc)
        return error_response(
            request,
            422 if not _is_openai(request) else 400,
            text,
            "invalid_input",
            param=first or None,
            errors=problems,
        )
