"""The checks of the narrow write path (morag.job_writes) and of the host tokens, pure: who may
send which change, which records pass for a split job's new pieces, what a request may hold."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from morag import job_writes
from morag.api.deps import AuthFailure, check_worker_token
from morag.job_record import Route, Source
from morag.jobs import new_record
from pydantic import ValidationError

FLEET = "fleet-token"
PARENT = "a" * 32


def _piece(**changes: object) -> dict:
    record = new_record(
        kind="process",
        content_type="audio",
        source=Source.upload(file_id="b" * 32, sha256="c" * 64, size=10, filename="piece"),
        options={"split": False},
        route=Route(queue="celery", gpu_requested=False, code="split_piece", reason="piece"),
        task_id="d" * 32,
    )
    record.parent_id = PARENT
    data = record.model_dump(mode="json")
    data.update(changes)
    return data


def test_each_host_has_its_own_token() -> None:
    a, b = job_writes.host_token(FLEET, "hosta"), job_writes.host_token(FLEET, "hostb")
    assert a != b and len(a) == 64 and a == job_writes.host_token(FLEET, "hosta")
    assert job_writes.host_token("another-fleet", "hosta") != a
    assert FLEET not in a


def test_the_api_knows_the_caller_by_its_token() -> None:
    token_a = job_writes.host_token(FLEET, "hosta")
    assert check_worker_token(FLEET, FLEET) is None  # the fleet's: any host
    assert check_worker_token(FLEET, FLEET, "hosta") is None
    assert check_worker_token(token_a, FLEET, "hosta") == "hosta"
    for given, host in [(token_a, "hostb"), (token_a, None), ("x", "hosta"), (token_a, "a b")]:
        with pytest.raises(AuthFailure) as refused:
            check_worker_token(given, FLEET, host)
        assert refused.value.status == 403
    with pytest.raises(AuthFailure) as missing:
        check_worker_token(None, FLEET, "hosta")
    assert missing.value.status == 401
    with pytest.raises(AuthFailure):  # no fleet token configured: nobody
        check_worker_token(token_a, None, "hosta")


@pytest.mark.parametrize(
    ("owner", "host"),
    [("cpu0@hosta/123", "hosta"), ("gpu1-mig0@gpu.example/9", "gpu.example"), ("w@h", "h")],
)
def test_host_of_an_owner(owner: str, host: str) -> None:
    assert job_writes.host_of(owner) == host


def test_a_host_may_name_only_its_own_workers() -> None:
    job_writes.check_host(None, "cpu0@anywhere/1")
    job_writes.check_host("hosta", "cpu0@hosta/1")
    for owner in ("cpu0@hostb/1", "cpu0@hosta.evil/1", "cpu0/1", "hosta"):
        with pytest.raises(job_writes.WriteRefused):
            job_writes.check_host("hosta", owner)


def test_only_a_new_piece_of_that_job_passes() -> None:
    ok = job_writes.PiecesOp.model_validate({"records": [_piece()]}).records[0]
    assert job_writes.piece_problem(ok, PARENT) is None
    assert job_writes.piece_problem(ok, "e" * 32) == "it names another job"
    bad = {
        "status": {"status": "running"},
        "attempts": {"owner": "cpu0@hosta/1"},
        "url": {"source": {"type": "url", "url": "http://169.254.169.254/"}},
        "webhook": {"webhook_url": "http://attacker.example/"},
        "store": {"store": True},
        "extra": {"surprise": 1},
        "kind": {"kind": "ingest"},
    }
    for name, changes in bad.items():
        record = job_writes.PiecesOp.model_validate({"records": [_piece(**changes)]}).records[0]
        assert job_writes.piece_problem(record, PARENT), name


def test_requests_are_checked_before_anything_runs() -> None:
    with pytest.raises(KeyError):
        job_writes.parse("delete_everything", {})
    with pytest.raises(ValidationError):
        job_writes.parse("finish", {"owner": "w@h/1", "surprise": True})
    with pytest.raises(ValidationError):
        job_writes.parse("claim", {"attempt": {}, "max_deliveries": 3})  # no owner
    with pytest.raises(ValidationError):
        job_writes.parse("device", {"owner": "w@h/1", "device": "tpu"})
    op = job_writes.parse("progress", {"owner": "w@h/1", "progress": 0.5, "op": "finish"})
    assert isinstance(op, job_writes.ProgressOp)  # the path names the operation


def _worker_token_cli(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    return subprocess.run(
        [sys.executable, "-m", "morag.cli", "worker-token", "hosta"],
        env={**clean, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_derives_a_host_token_from_the_fleets_only() -> None:
    """`morag worker-token HOST` from the fleet's token (an API host's env); from a worker
    host's env (its own token) it refuses instead of printing a token the API rejects."""
    out = _worker_token_cli(MORAG_WORKER_TOKEN=FLEET)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == job_writes.host_token(FLEET, "hosta")
    own = job_writes.host_token(FLEET, "hostb")
    out = _worker_token_cli(
        MORAG_WORKER_TOKEN=own, MORAG_JOB_WRITES="api", MORAG_WORKER_HOST="hostb"
    )
    assert out.returncode == 2
    assert "not the fleet's worker token" in out.stderr and "host hostb's own" in out.stderr
    assert own not in out.stdout + out.stderr
