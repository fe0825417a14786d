"""``/process/*``: run a job and wait for its result (202 with the id if it takes longer)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from morag import urls
from morag.api.deps import ApiKey, accept_upload, bad_input, limit_body, services, wait_for_end
from morag.jobs import SUCCEEDED, Record
from morag.submission import BadInput, Services, parse_json_object, submit, url_content_type

router = APIRouter(prefix="/process", tags=["process"], dependencies=[ApiKey])


class ProcessUrl(BaseModel):
    url: str = Field(min_length=1, max_length=4096)
    options: dict[str, Any] = Field(default_factory=dict)


async def _answer(svc: Services, record: Record, started: float) -> Any:
    final = await wait_for_end(svc, record["task_id"], svc.settings.process_wait)
    final = final or record
    if final["status"] == SUCCEEDED:
        return {
            "task_id": final["task_id"],
            "route": final["route"],
            "result": final["result"],
            "processing_time": round(time.monotonic() - started, 3),
        }
    if final["status"] in ("queued", "running"):
        return JSONResponse(
            {"task_id": final["task_id"], "route": final["route"], "status": final["status"]},
            status_code=202,
        )
    raise HTTPException(
        422, f"processing failed (job {final['task_id']}): {final['error'] or final['status']}"
    )


@router.post("/file", dependencies=[Depends(limit_body)])
async def process_file(
    file: UploadFile = File(...),
    options: str | None = Form(default=None),
    gpu: bool = Query(default=False, description="run on a GPU worker when one is alive"),
    svc: Services = Depends(services),
) -> Any:
    started = time.monotonic()
    try:
        opts = parse_json_object(options, "options")
        accepted = await run_in_threadpool(accept_upload, svc, file, opts)
        record = await run_in_threadpool(
            lambda: submit(svc, kind="process", options=opts, gpu=gpu, **accepted)
        )
    except BadInput as exc:
        raise bad_input(exc) from exc
    return await _answer(svc, record, started)


@router.post("/url")
async def process_url(
    body: ProcessUrl,
    gpu: bool = Query(default=False, description="run on a GPU worker when one is alive"),
    svc: Services = Depends(services),
) -> Any:
    started = time.monotonic()
    try:
        await run_in_threadpool(urls.check_url, body.url, svc.settings.url_allowlist)
        content_type = url_content_type(body.url, body.options)
        record = await run_in_threadpool(
            lambda: submit(
                svc,
                kind="process",
                content_type=content_type,
                source={"type": "url", "url": body.url},
                options=body.options,
                gpu=gpu,
            )
        )
    except urls.UrlRefused as exc:
        raise HTTPException(422, f"URL refused: {exc}") from exc
    except BadInput as exc:
        raise bad_input(exc) from exc
    return await _answer(svc, record, started)
