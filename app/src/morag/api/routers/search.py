"""``/api/v1/search``: similarity search over stored chunks, and deleting a source's chunks.

Both run on the server's ``morag-store`` worker (it owns the embedding model and the vector
store); the API sends the request there and waits for the answer on a Redis list. With no
live ``morag-store`` worker (no heartbeat) the answer is a 503 at once, not after
MORAG_SEARCH_TIMEOUT.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from morag import store_requests
from morag.api.deps import ApiKey, services
from morag.api.errors import ApiError
from morag.api.schemas import Deleted, SearchAnswer, SearchRequest, errors
from morag.celery_app import celery_app
from morag.config import STORE_QUEUE
from morag.fleet import read_fleet
from morag.jobs import new_id
from morag.submission import Services

router = APIRouter(
    prefix="/api/v1/search", tags=["search"], dependencies=[ApiKey], responses=errors()
)


def _store_worker_alive(svc: Services) -> bool:
    if svc.fleet.get().snapshot.consumers_of(STORE_QUEUE):
        return True
    # The cached view may predate a worker that just started: read the heartbeats afresh
    # before refusing.
    return bool(read_fleet(svc.redis).snapshot.consumers_of(STORE_QUEUE))


def _ask_store(svc: Services, op: str, params: dict[str, Any]) -> dict[str, Any]:
    if not _store_worker_alive(svc):
        # Heartbeats are the liveness the API knows: nobody would take the request, and
        # waiting MORAG_SEARCH_TIMEOUT would only delay the 503.
        raise ApiError(
            503,
            f"no live {STORE_QUEUE} worker: search and deletion run there "
            f"(start `morag worker --queue {STORE_QUEUE}` on the server)",
            "store_unavailable",
        )
    request_id = new_id()
    key = f"morag:reply:{request_id}"
    # The operation goes through a key workers cannot write; the message names only its id
    # (store_requests: a worker's credential can push to morag-store, too).
    store_requests.put(svc.redis, request_id, op, params, svc.settings.search_timeout)
    celery_app.send_task("morag.vector_op", (request_id,), queue=STORE_QUEUE)
    deadline = time.monotonic() + svc.settings.search_timeout
    while time.monotonic() < deadline:
        item = svc.redis.blpop([key], timeout=1)
        if item is not None:
            answer = json.loads(item[1])
            if "error" in answer:
                raise ApiError(503, f"vector store error: {answer['error']}", "store_error")
            return answer
    raise ApiError(
        503,
        f"no answer from a {STORE_QUEUE} worker within {svc.settings.search_timeout:.0f}s "
        f"(is `morag worker --queue {STORE_QUEUE}` running?)",
        "store_unavailable",
    )


@router.post("", response_model=SearchAnswer)
async def search(body: SearchRequest, svc: Services = Depends(services)) -> SearchAnswer:
    params = {"query": body.query, "limit": body.limit, "filter": body.filter}
    answer = await run_in_threadpool(_ask_store, svc, "search", params)
    return SearchAnswer(query=body.query, count=len(answer["results"]), results=answer["results"])


@router.delete("/source", response_model=Deleted)
async def delete_source(
    source: str = Query(min_length=1, max_length=4096, description="file name or URL"),
    svc: Services = Depends(services),
) -> Deleted:
    answer = await run_in_threadpool(_ask_store, svc, "delete", {"filter": {"source": source}})
    return Deleted(source=source, deleted=answer["deleted"])
