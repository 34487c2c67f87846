"""Errors as ``application/problem+json`` (RFC 9457), with field paths on bad input.

Every error the API returns goes through here: a raised :class:`Problem`, a
request that fails validation, an unknown route or method, and, as a last
resort, an unexpected exception (a 500 that names nothing internal).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatcher.errors import KafkaSetupError, OutcomeUnknown, Problem, Refusal

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://docs.bullseye.example/problems/"


class FieldError(BaseModel):
    """One invalid input: where (``body.url``, ``query.limit``) and why."""

    path: str
    message: str


class ProblemBody(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="A URI naming the kind of problem.")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None


#: An OpenAPI answer whose body is a problem document (add its ``description``).
PROBLEM: dict[str, Any] = {
    "model": ProblemBody,
    "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemBody"}}},
}


def field_problem(path: str, message: str, status: int = 422) -> Problem:
    """A validation problem on one field."""
    return Problem(
        status,
        "validation-error",
        "The request is not valid",
        f"{path}: {message}",
        [FieldError(path=path, message=message)],
    )


def not_found(what: str) -> Problem:
    return Problem(404, "not-found", "Not found", f"no such {what}")


#: Where a refused field is in a request (path parameters; everything else is the body).
_FIELD_PATHS = {"webhook_id": "path.webhook_id", "organization_id": "path.org"}


def refusal_problem(exc: Refusal) -> Problem:
    """The one mapping of the management rules' refusals to problem documents."""
    message = str(exc)
    if exc.kind == "not-found":
        return not_found("webhook")
    if exc.kind == "stale":
        return Problem(412, "precondition-failed", "The webhook has changed", message)
    if exc.kind == "plan-unset":
        return Problem(409, "plan-unset", "The organization has no plan", message)
    if exc.kind == "plan-not-entitled":
        return Problem(409, "plan-not-entitled", "The organization's plan has no webhooks", message)
    path = _FIELD_PATHS.get(exc.field or "", f"body.{exc.field}" if exc.field else "body")
    if exc.kind == "conflict":
        return Problem(
            409,
            "conflict",
            "Conflicts with the current state",
            message,
            [FieldError(path=path, message=message)],
        )
    return field_problem(path, message)


def respond(problem: Problem, instance: str | None = None) -> JSONResponse:
    body = ProblemBody(
        type=TYPE_BASE + problem.kind,
        title=problem.title,
        status=problem.status,
        detail=problem.detail,
        instance=instance,
        errors=None
        if problem.errors is None
        else [FieldError(path=e.path, message=e.message) for e in problem.errors],
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers,
    )


def _path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (RFC 9110 ``Allow``).

    Starlette names only the methods of the first route that matched the path,
    and each method of a path is a route of its own here. The routes are the ones
    the application listed when it was built (``state.routes``).
    """
    path = request.url.path
    routes: list[tuple[re.Pattern[str], set[str]]] = request.app.state.routes
    return sorted({m for regex, methods in routes if regex.match(path) for m in methods})


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return respond(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            FieldError(
                path=_path(err.get("loc", ())),
                message=str(err.get("msg", "invalid")).removeprefix("Value error, "),
            )
            for err in exc.errors()[:20]
        ]
        detail = "; ".join(f"{e.path}: {e.message}" for e in errors[:3])
        problem = Problem(422, "validation-error", "The request is not valid", detail, errors)
        return respond(problem, request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # a body that cannot even be parsed (bad bytes)
            return respond(field_problem("body", str(exc.detail)), request.url.path)
        titles = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized"}
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        problem = Problem(
            exc.status_code,
            {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error"),
            titles.get(exc.status_code, "Request refused"),
            None if exc.status_code in titles else str(exc.detail),
            headers=headers or None,
        )
        return respond(problem, request.url.path)

    async def on_refusal(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Refusal)
        return respond(refusal_problem(exc), request.url.path)

    async def on_kafka(request: Request, exc: Exception) -> JSONResponse:
        log.warning("API request not completed: %s", exc)
        if isinstance(exc, OutcomeUnknown):
            problem = Problem(
                503,
                "outcome-unknown",
                "Outcome unknown",
                "Kafka did not confirm the change and it cannot be read back now: it may or "
                "may not have been applied. Read the webhook back once the service is ready, "
                "or retry a create with the same Idempotency-Key, which returns the real outcome",
                headers={"Retry-After": "5"},
            )
        else:
            problem = Problem(
                503,
                "unavailable",
                "Kafka unavailable",
                "the change was not applied; retry it (a create with the same Idempotency-Key)",
                headers={"Retry-After": "5"},
            )
        return respond(problem, request.url.path)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API request failed: %s %s", request.method, request.url.path)
        problem = Problem(500, "internal-error", "Internal error", "the request was not completed")
        return respond(problem, request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Refusal, on_refusal)
    app.add_exception_handler(KafkaSetupError, on_kafka)
    app.add_exception_handler(Exception, on_crash)
