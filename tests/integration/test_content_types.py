"""Every content type through the API on both queues (gpu=true -> gpu-tasks worker,
gpu=false -> celery worker; all on CPU here), and bad input per type."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import Stack

WEB_MAX_BYTES = 100_000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    made = {
        "video": media.speech_video(d / "speech.mp4"),
        "silent": media.silent_video(d / "silent.mp4"),
        "quiet": media.silent_audio(d / "quiet.wav"),
        "docx": media.docx_file(d / "notes.docx"),
        "pptx": media.pptx_file(d / "slides.pptx"),
        "xlsx": media.xlsx_file(d / "fruit.xlsx"),
        "pdf": media.pdf_file(d / "bees.pdf"),
        "png": media.png_file(d / "invoice.png"),
        "html": media.html_page(d / "page.html"),
    }
    (d / "big.html").write_text("<html><body>" + "<p>word</p>" * 20_000 + "</body></html>")
    return made


@pytest.fixture(scope="module")
def web(inputs: dict[str, Path]) -> Iterator[str]:
    with media.http_server(inputs["html"].parent) as url:
        yield url


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workers = {"gpu0@ct": "gpu-tasks", "cpu0@ct": "celery"}
    root = tmp_path_factory.mktemp("ctstack")
    with running_stack(
        redis_server, root, workers, web_max_bytes=WEB_MAX_BYTES, process_wait=90
    ) as s:
        yield s


def _file(stack: Stack, path: Path, gpu: bool, options: str | None = None) -> Any:
    with stack.client() as c, open(path, "rb") as f:
        data = {"options": options} if options else {}
        return c.post(
            "/process/file",
            params={"gpu": str(gpu).lower()},
            files={"file": (path.name, f)},
            data=data,
            timeout=120,
        )


def _url(stack: Stack, url: str, gpu: bool, options: dict | None = None) -> Any:
    with stack.client() as c:
        return c.post(
            "/process/url",
            params={"gpu": str(gpu).lower()},
            json={"url": url, "options": options or {}},
            timeout=120,
        )


def _ok(resp: Any, gpu: bool) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["route"]["queue"] == ("gpu-tasks" if gpu else "celery"), body["route"]
    return body["result"]


def _words(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


GPU = pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])


def test_heartbeat_lists_every_processor(stack: Stack) -> None:
    beat = stack.heartbeat("gpu0@ct")
    assert beat is not None
    assert {"audio", "video", "document", "image", "web", "youtube"} <= set(beat["processors"])


@GPU
def test_video_is_transcribed(stack: Stack, inputs: dict[str, Path], gpu: bool) -> None:
    result = _ok(_file(stack, inputs["video"], gpu), gpu)
    text = _words(result["content"])
    assert "train" in text and "mountains" in text and "morning" in text
    meta = result["metadata"]
    assert meta["content_type"] == "video" and meta["video_codec"] == "mpeg4"
    assert meta["audio_codec"] == "aac" and meta["resolution"] == "320x240"
    assert meta["duration"] > 1 and meta["model"] == "tiny.en"
    assert result["segments"]


def test_audio_without_speech_succeeds_with_a_warning(
    stack: Stack, inputs: dict[str, Path]
) -> None:
    result = _ok(_file(stack, inputs["quiet"], False), False)
    # Whisper may write a row of dots over noise: no word either way.
    assert not any(ch.isalnum() for ch in result["content"]), result["content"]
    assert result["warnings"] == [
        "no speech found in 20.0 s of audio: the transcript holds no words"
    ]


def test_speech_has_no_warning(stack: Stack, inputs: dict[str, Path]) -> None:
    result = _ok(_file(stack, inputs["video"], False), False)
    assert result["content"] and result["warnings"] == []


def test_video_without_audio_fails_with_reason(stack: Stack, inputs: dict[str, Path]) -> None:
    resp = _file(stack, inputs["silent"], True)
    assert resp.status_code == 422
    assert "no audio track" in resp.json()["detail"]


@GPU
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("docx", [media.DOCX_SENTENCE, "| paint", "| brushes"]),
        ("pptx", [media.PPTX_SENTENCE, "Bakery news"]),
        ("xlsx", [media.XLSX_WORD, "| fruit"]),
        ("pdf", [media.PDF_SENTENCE]),
    ],
)
def test_documents_become_markdown(
    stack: Stack, inputs: dict[str, Path], gpu: bool, name: str, expected: list[str]
) -> None:
    result = _ok(_file(stack, inputs[name], gpu), gpu)
    content = " ".join(result["content"].split())
    for piece in expected:
        assert piece in content, content
    meta = result["metadata"]
    assert meta["content_type"] == "document" and meta["format"] == name
    if name == "pdf":
        assert meta["pdf_pipeline"] == "text-layer" and meta["pages"] == 1
    else:
        assert meta["converter"] == "docling"


@GPU
def test_image_text_by_ocr(stack: Stack, inputs: dict[str, Path], gpu: bool) -> None:
    result = _ok(_file(stack, inputs["png"], gpu), gpu)
    assert media.PNG_TEXT in result["content"]
    meta = result["metadata"]
    assert (meta["format"], meta["width"], meta["height"]) == ("PNG", 900, 160)


@GPU
def test_web_page_main_text(stack: Stack, web: str, gpu: bool) -> None:
    result = _ok(_url(stack, f"{web}/page.html", gpu), gpu)
    assert media.WEB_SENTENCE in result["content"]
    assert "Copyright" not in result["content"]  # boilerplate left out
    assert result["metadata"]["title"] == "Island history"
    assert result["metadata"]["content_type"] == "web"


@GPU
def test_media_url_through_yt_dlp(stack: Stack, web: str, gpu: bool) -> None:
    result = _ok(_url(stack, f"{web}/speech.mp4", gpu), gpu)
    assert "train" in _words(result["content"])
    assert result["metadata"]["downloader"] == "yt-dlp"
    assert result["metadata"]["content_type"] == "youtube"


def test_content_type_option_overrides_detection(stack: Stack, inputs: dict[str, Path]) -> None:
    # An HTML file uploaded as a document; and the same bytes forced to "web" fail clearly.
    result = _ok(_file(stack, inputs["html"], False), False)
    assert media.WEB_SENTENCE in result["content"]
    resp = _file(stack, inputs["html"], False, options='{"content_type": "web"}')
    assert resp.status_code == 422 and "needs a URL" in resp.json()["detail"]


# -- bad input ------------------------------------------------------------------------------


def test_truncated_pdf_fails_with_reason(
    stack: Stack, inputs: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(inputs["pdf"].read_bytes()[:200])
    resp = _file(stack, bad, False)
    assert resp.status_code == 422
    assert "PDF" in resp.json()["detail"]


def test_zero_byte_and_corrupt_images(stack: Stack, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    resp = _file(stack, empty, True)
    assert resp.status_code == 422 and "empty" in resp.json()["detail"]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    resp = _file(stack, corrupt, True)
    assert resp.status_code == 422 and "cannot read the image" in resp.json()["detail"]


def test_html_over_the_size_limit(stack: Stack, web: str) -> None:
    resp = _url(stack, f"{web}/big.html", False)
    assert resp.status_code == 422
    assert f"exceeds {WEB_MAX_BYTES} bytes" in resp.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/page.html",
        "http://[::1]:9/x.mp4",
        "file:///etc/passwd",
        "http://169.254.169.254/latest",
    ],
)
def test_refused_urls(stack: Stack, url: str) -> None:
    resp = _url(stack, url, False)
    assert resp.status_code == 422, resp.text
    assert "refused" in resp.json()["detail"]


def test_unsupported_extension_is_415(stack: Stack, tmp_path: Path) -> None:
    odd = tmp_path / "data.xyz"
    odd.write_bytes(b"\x00\x01\x02binary stuff" * 10)
    resp = _file(stack, odd, False)
    assert resp.status_code == 415 and "unsupported" in resp.json()["detail"]


def test_workers_keep_serving_after_bad_input(stack: Stack, inputs: dict[str, Path]) -> None:
    for gpu in (True, False):
        result = _ok(_file(stack, inputs["docx"], gpu), gpu)
        assert media.DOCX_SENTENCE in result["content"]
    assert stack.alive("gpu0@ct") and stack.alive("cpu0@ct")
