"""The Qdrant vector store: local mode on disk by default, a Qdrant server in production.

Local mode allows one process at a time on a directory; every operation here opens the
store under an exclusive file lock and closes it afterwards, so the children of the
``morag-store`` worker (and any tool) take turns instead of failing. With
``MORAG_QDRANT_URL`` one client is kept per process and the server handles concurrency.
"""

from __future__ import annotations

import contextlib
import fcntl
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

from morag.config import Settings

POINT_NAMESPACE = uuid.UUID("6f1c1f7e-0a51-4f7b-9b1f-3c1b4d1e2a10")
TOP_LEVEL_FIELDS = ("job_id", "source", "content_type", "chunk_index", "section")

_server_clients: dict[str, Any] = {}


def point_id(job_id: str, index: int) -> str:
    """Deterministic, so storing the same job again replaces its points."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{job_id}:{index}"))


def client_options(settings: Settings) -> dict[str, Any]:
    """``QdrantClient``'s keyword arguments: a Qdrant server (REST) with MORAG_QDRANT_URL,
    local mode on disk at MORAG_QDRANT_PATH without it (one process at a time: open_client)."""
    if not settings.qdrant_url:
        return {"path": str(settings.qdrant_path)}
    options: dict[str, Any] = {"url": settings.qdrant_url}
    if settings.qdrant_api_key is not None:
        options["api_key"] = settings.qdrant_api_key.get_secret_value()
    if settings.qdrant_ca_file is not None:
        # Passed on to the httpx client of the REST API.
        options["verify"] = ssl.create_default_context(cafile=str(settings.qdrant_ca_file))
        # qdrant-client's server version check is a bare httpx.get that ignores `verify`:
        # against a private CA it could only fail and log a misleading warning.
        options["check_compatibility"] = False
    return options


@contextlib.contextmanager
def open_client(settings: Settings) -> Iterator[Any]:
    from qdrant_client import QdrantClient

    if settings.qdrant_url:
        if settings.qdrant_url not in _server_clients:
            _server_clients[settings.qdrant_url] = QdrantClient(**client_options(settings))
        yield _server_clients[settings.qdrant_url]
        return
    path = settings.qdrant_path
    path.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.morag-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = QdrantClient(**client_options(settings))
        try:
            yield client
        finally:
            client.close()
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_collection(client: Any, name: str, size: int) -> None:
    from qdrant_client import models

    if not client.collection_exists(name):
        client.create_collection(
            name, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE)
        )


def build_filter(conditions: dict[str, Any] | None) -> Any:
    """``{"source": "a.pdf", "lang": "en"}``: top-level fields as they are, any other key
    is looked up in the stored job metadata (``metadata.<key>``). Values must all match."""
    if not conditions:
        return None
    from qdrant_client import models

    must = []
    for key, value in conditions.items():
        field = key if key in TOP_LEVEL_FIELDS or key.startswith("metadata.") else f"metadata.{key}"
        if isinstance(value, float):
            # Qdrant's MatchValue takes keywords, integers and booleans only (a float made
            # the store fail and the API answer 503): a number is matched as a closed range.
            must.append(models.FieldCondition(key=field, range=models.Range(gte=value, lte=value)))
            continue
        if isinstance(value, list):
            match: Any = models.MatchAny(any=value)
        else:
            match = models.MatchValue(value=value)
        must.append(models.FieldCondition(key=field, match=match))
    return models.Filter(must=must)


def upsert_chunks(
    settings: Settings, job_id: str, vectors: list[list[float]], payloads: list[dict[str, Any]]
) -> int:
    from qdrant_client import models

    with open_client(settings) as client:
        name = settings.qdrant_collection
        if vectors:
            _ensure_collection(client, name, len(vectors[0]))
        if client.collection_exists(name):
            # Idempotent: a redelivered store task replaces what an earlier try wrote.
            client.delete(name, points_selector=build_filter({"job_id": job_id}), wait=True)
        if not vectors:
            return 0
        points = [
            models.PointStruct(id=point_id(job_id, p["chunk_index"]), vector=v, payload=p)
            for v, p in zip(vectors, payloads, strict=True)
        ]
        client.upsert(name, points=points, wait=True)
    return len(points)


def search(
    settings: Settings, vector: list[float], limit: int, conditions: dict[str, Any] | None
) -> list[dict[str, Any]]:
    with open_client(settings) as client:
        if not client.collection_exists(settings.qdrant_collection):
            return []
        found = client.query_points(
            settings.qdrant_collection,
            query=vector,
            limit=limit,
            query_filter=build_filter(conditions),
            with_payload=True,
        ).points
    return [{"score": round(float(p.score), 4), **(p.payload or {})} for p in found]


def delete_where(settings: Settings, conditions: dict[str, Any]) -> int:
    """Delete the points matching ``conditions``; answer how many there were."""
    from qdrant_client import models

    selector = build_filter(conditions)
    with open_client(settings) as client:
        name = settings.qdrant_collection
        if not client.collection_exists(name):
            return 0
        count = client.count(name, count_filter=selector, exact=True).count
        if count:
            client.delete(name, points_selector=models.FilterSelector(filter=selector), wait=True)
    return int(count)
