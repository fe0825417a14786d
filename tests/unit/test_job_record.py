"""The job's types (morag.job_record): one definition, read by attribute everywhere."""

from __future__ import annotations

import ast
from pathlib import Path

from morag.job_record import JobRecord, JobStatus, Route, Source
from morag.jobs import new_record

APP = Path(__file__).resolve().parents[2] / "app" / "src" / "morag"
JOB_NAMES = {"record", "rec", "final", "job", "new"}


def test_no_module_reads_a_job_through_string_keys() -> None:
    """``record["status"]`` or ``record.get("route")`` on a job would bypass its type."""
    found = []
    for path in sorted(APP.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            target = None
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                target = node.value
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                target = node.func.value
            if isinstance(target, ast.Name) and target.id in JOB_NAMES:
                found.append(f"{path.relative_to(APP)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_a_new_record_round_trips_through_its_json() -> None:
    record = new_record(
        kind="ingest",
        content_type="web",
        source=Source.link("https://example.org/"),
        options={"beam_size": 2},
        route=Route(queue="celery", gpu_requested=False, code="not_requested", reason="r"),
        metadata={"team": "a"},
    )
    again = JobRecord.from_json(record.to_json())
    assert again == record and again.status is JobStatus.queued
    assert again.source.label == "https://example.org/" and again.upload_id is None
    upload = Source.upload(file_id="abc", sha256="0" * 64, size=1, filename="talk.mp3")
    assert record.model_copy(update={"source": upload}).upload_id == "abc"
    assert upload.label == "talk.mp3"


def test_a_record_from_before_route_codes_is_still_read() -> None:
    stored = new_record(
        kind="process",
        content_type="audio",
        source=Source.link("https://example.org/a.mp3"),
        options={},
        route=Route(queue="celery", gpu_requested=False, code="not_requested", reason="r"),
    ).model_dump(mode="json")
    del stored["route"]["code"]
    assert JobRecord.model_validate(stored).route.code == "unknown"
