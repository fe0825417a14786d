"""Request parameters shared by the routers: paging, job options, the ``gpu`` flag."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from fastapi import Query
from pydantic import ValidationError

from morag.api.errors import ApiError
from morag.api.schemas import JobOptions

MAX_PAGE = 500


@dataclass(frozen=True)
class Paging:
    limit: int
    offset: int

    def cut(self, items: list[Any]) -> list[Any]:
        return items[self.offset : self.offset + self.limit]


def paging(
    limit: int = Query(default=100, ge=1, le=MAX_PAGE, description="page size"),
    offset: int = Query(default=0, ge=0, le=1_000_000, description="items to skip"),
) -> Paging:
    return Paging(limit=limit, offset=offset)


def _normal(name: str) -> str:
    return name.lower().replace("-", "_")


def misspelt_options(options: dict[str, Any]) -> list[str]:
    """``options.subtitle: unknown option (did you mean subtitles?)`` for each member that is
    not an option but nearly one. Other unknown members still pass to the processor."""
    known = {_normal(name): name for name in JobOptions.model_fields}
    problems = []
    for name in options:
        if name in JobOptions.model_fields:
            continue
        close = difflib.get_close_matches(_normal(name), list(known), n=1, cutoff=0.8)
        if close:
            problems.append(f"options.{name}: unknown option (did you mean {known[close[0]]}?)")
    return problems


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate the members of ``options`` this service knows, and refuse near-misses of
    them (a typo would otherwise be ignored without a word); the dict stays as sent."""
    misspelt = misspelt_options(options)
    if misspelt:
        raise ApiError(422, "; ".join(misspelt), "invalid_input")
    try:
        JobOptions.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(
            f"options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(422, problems, "invalid_input") from exc
    return options


def one_gpu_flag(body_value: bool | None, query_value: bool | None) -> bool:
    """``gpu`` belongs in the body; the deprecated ``?gpu=`` is still read. Both must agree."""
    if body_value is not None and query_value is not None and body_value != query_value:
        raise ApiError(
            422,
            "gpu given twice with different values: send it once, in the request body",
            "invalid_input",
        )
    value = body_value if body_value is not None else query_value
    return bool(value)
