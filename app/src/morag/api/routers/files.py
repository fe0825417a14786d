"""``/api/v1/files/{file_id}``: uploads for workers that cannot see the shared directory."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from morag import files
from morag.api.deps import require_worker_token, services
from morag.submission import Services

router = APIRouter(
    prefix="/api/v1/files", tags=["files"], dependencies=[Depends(require_worker_token)]
)


@router.get("/{file_id}")
def download(file_id: str, svc: Services = Depends(services)) -> FileResponse:
    try:
        path = files.upload_path(svc.settings.uploads_dir, file_id)
    except files.FileUnavailable as exc:
        raise HTTPException(404, "unknown file id") from exc
    if not path.is_file():
        raise HTTPException(404, "unknown file id")
    return FileResponse(path, media_type="application/octet-stream")
