"""Settings validation: one object, MORAG_ prefix, refusals with a reason."""

from __future__ import annotations

import pytest
from morag.config import Settings
from pydantic import ValidationError


def test_comma_separated_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAG_API_KEYS", "one, two ,,three")
    assert Settings().api_key_values() == ["one", "two", "three"]


def test_secrets_do_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAG_API_KEYS", "s3cret-key")
    monkeypatch.setenv("MORAG_REDIS_URL", "redis://:hunter2@redis:6379/0")
    text = repr(Settings())
    assert "s3cret-key" not in text and "hunter2" not in text


@pytest.mark.parametrize("value", ["cpu", "cuda", "auto"])
def test_device_choices(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MORAG_DEVICE", value)
    assert Settings().device == value


@pytest.mark.parametrize("value", ["gpu", "true", "CPU!"])
def test_unknown_device_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MORAG_DEVICE", value)
    with pytest.raises(ValidationError):
        Settings()


def test_forcing_cpu_never_selects_the_gpu() -> None:
    from morag.devices import detect_device

    info = detect_device(Settings(device="cpu").device)
    assert info.device == "cpu" and info.reason == "MORAG_DEVICE=cpu"


def test_visibility_timeout_must_exceed_the_job_time_limit() -> None:
    with pytest.raises(ValidationError, match="must exceed MORAG_JOB_TIME_LIMIT"):
        Settings(job_time_limit=7200, visibility_timeout=3600)


def test_defaults_are_safe_for_long_jobs() -> None:
    s = Settings()
    assert s.visibility_timeout > s.job_time_limit
    assert s.heartbeat_interval < s.heartbeat_ttl


def test_celery_config_delivery_guarantees() -> None:
    from morag.celery_app import celery_config

    conf = celery_config(Settings(job_time_limit=100, visibility_timeout=200))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_create_missing_queues"] is False
    assert conf["broker_transport_options"]["visibility_timeout"] == 200
    assert conf["task_time_limit"] == 100
    assert {"celery", "gpu-tasks"} <= {q.name for q in conf["task_queues"]}


def test_nothing_connects_at_import() -> None:
    import importlib

    import morag.api.app
    import morag.runtime
    import morag.worker

    importlib.reload(morag.runtime)
    assert morag.runtime._runtime is None
    assert morag.runtime._device is None


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [
        f"MORAG_{n.upper()}" for n in Settings.model_fields if f"MORAG_{n.upper()}" not in doc
    ]
    assert missing == [], f"document these in docs/configuration.md: {missing}"
