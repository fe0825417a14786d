"""Warm workers (morag.warmup): the model is loaded before the worker advertises itself.

Real Celery workers on a real Redis (the role's ACL users). Asserted on the first heartbeat
a worker publishes, so a job routed by it never meets a cold pool process; the time saved
is measured by tests/bench/overhead.py, not here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from morag.models import bundled_model_path

from tests.integration.stack import Stack


def test_a_worker_advertises_itself_with_its_model_loaded(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.start_worker("cpu0@warm", "celery")
    warmup = stack.heartbeat("cpu0@warm")["warmup"]  # its first heartbeat
    assert warmup["state"] == "warm", warmup
    assert warmup["device"] == "cpu"
    assert warmup["seconds"] > 0


def test_warm_up_can_be_turned_off(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(warmup="false")
    stack.start_worker("cpu0@cold", "celery")
    assert stack.heartbeat("cpu0@cold")["warmup"] == {"state": "off"}


def test_a_model_that_fails_to_load_leaves_the_worker_up_saying_why(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    # Every file a model needs is there (the start check passes), but the weights are junk.
    bundled = bundled_model_path()
    assert bundled is not None
    broken = tmp_path / "broken-model"
    shutil.copytree(bundled, broken)
    (broken / "model.bin").write_bytes(b"not a CTranslate2 model")
    stack = make_stack(whisper_model=str(broken))
    stack.start_worker("cpu0@broken", "celery")
    beat = stack.heartbeat("cpu0@broken")
    assert beat["warmup"]["state"] == "failed", beat["warmup"]
    assert beat["warmup"]["error"]
    assert stack.alive("cpu0@broken")
    log = (stack.logs / "cpu0_broken.log").read_text()
    assert "warm-up failed on cpu" in log
