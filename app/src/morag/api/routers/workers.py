"""``/api/v1/workers``: live workers, straight from their heartbeats."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from morag.api.deps import ApiKey, services
from morag.submission import Services

router = APIRouter(prefix="/api/v1/workers", tags=["workers"], dependencies=[ApiKey])


@router.get("")
def live_workers(svc: Services = Depends(services)) -> dict[str, Any]:
    beats = svc.fleet.get().heartbeats
    return {"count": len(beats), "workers": beats}
