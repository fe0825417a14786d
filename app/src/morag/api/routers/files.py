"""``/api/v1/files/{file_id}``: uploads for workers that cannot see the shared directory."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from morag import files
from morag.api.deps import require_worker_token, services
from morag.api.errors import ApiError
from morag.api.schemas import ErrorBody
from morag.submission import Services

router = APIRouter(
    prefix="/api/v1/files", tags=["files"], dependencies=[Depends(require_worker_token)]
)


@router.get(
    "/{file_id}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            "description": "the upload's bytes",
        },
        401: {"model": ErrorBody, "description": "missing worker token"},
        403: {"model": ErrorBody, "description": "invalid worker token"},
        404: {"model": ErrorBody, "description": "unknown file id"},
        422: {"model": ErrorBody, "description": "invalid input"},
    },
)
def download(file_id: str, svc: Services = Depends(services)) -> FileResponse:
    try:
        path = files.upload_path(svc.settings.uploads_dir, file_id)
    except files.FileUnavailable as exc:
        raise ApiError(404, "unknown file id") from exc
    if not path.is_file():
        raise ApiError(404, "unknown file id")
    return FileResponse(path, media_type="application/octet-stream")
