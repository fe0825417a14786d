"""``/api/v1/workers``: live workers, straight from their heartbeats, a page at a time."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from morag.api.deps import ApiKey, services
from morag.api.params import Paging, paging
from morag.api.schemas import WorkerPage, errors
from morag.submission import Services

router = APIRouter(
    prefix="/api/v1/workers", tags=["workers"], dependencies=[ApiKey], responses=errors()
)


@router.get("", response_model=WorkerPage)
def live_workers(page: Paging = Depends(paging), svc: Services = Depends(services)) -> WorkerPage:
    beats = sorted(svc.fleet.get().heartbeats, key=lambda b: str(b.get("name")))
    shown = page.cut(beats)
    return WorkerPage(
        total=len(beats), count=len(shown), offset=page.offset, limit=page.limit, workers=shown
    )
