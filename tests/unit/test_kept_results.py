"""Which Redis answers a worker waits out, and the results it keeps on disk meanwhile."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis
from morag.config import Settings
from morag.execution import Outcome, keep, kept_outcomes, passing_outage
from morag.job_record import Result
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError


def _in_pipeline(exc: redis.RedisError) -> redis.RedisError:
    """As redis-py raises it from a transaction: the command (a job record) quoted first."""
    exc.args = (f'Command # 3 (SET morag:job:1 {{"secret": 1}}) of pipeline caused error: {exc}',)
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            redis.ConnectionError("Connection refused."),
            "Redis unavailable (Connection refused.)",
        ),
        (
            _in_pipeline(OutOfMemoryError("command not allowed", status_code="OOM")),
            "Redis refuses writes (OOM command not allowed)",
        ),
        (
            _in_pipeline(ReadOnlyError("You can't write", status_code="READONLY")),
            "Redis refuses writes (READONLY You can't write)",
        ),
        (
            _in_pipeline(redis.ResponseError("MISCONF Redis is configured to save")),
            "Redis refuses writes (MISCONF Redis is configured to save)",
        ),
    ],
)
def test_outages_and_refused_writes_are_waited_out_without_quoting_the_command(
    exc: redis.RedisError, reason: str
) -> None:
    assert passing_outage(exc) == reason


@pytest.mark.parametrize(
    "exc",
    [
        NoPermissionError("this user has no permissions to access one of the keys"),
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ],
)
def test_other_answers_are_not_an_outage(exc: redis.RedisError) -> None:
    assert passing_outage(exc) is None


def test_a_kept_result_is_private_and_read_back_whole(tmp_path: Path) -> None:
    settings = Settings(work_dir=tmp_path)
    outcome = Outcome(result=Result(content="the transcript", metadata={"device": "cpu"}))
    path = keep(settings, "cpu0@host", "abc123", "cpu0@host/42", outcome)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    [kept] = kept_outcomes(settings, "cpu0@host")
    assert (kept.task_id, kept.owner, kept.path) == ("abc123", "cpu0@host/42", path)
    assert kept.outcome == outcome
    assert kept_outcomes(settings, "gpu0@host") == []  # each worker keeps its own


def test_an_unreadable_kept_result_is_set_aside(tmp_path: Path) -> None:
    settings = Settings(work_dir=tmp_path)
    keep(settings, "w", "good", "w/1", Outcome(error="failed"))
    bad = keep(settings, "w", "bad", "w/1", Outcome(error="x"))
    bad.write_text("{not json")
    assert [k.task_id for k in kept_outcomes(settings, "w")] == ["good"]
    assert bad.with_suffix(".bad").exists() and not bad.exists()
