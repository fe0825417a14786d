"""YouTube and other media URLs: yt-dlp downloads the audio, then the audio processor
transcribes it. yt-dlp's generic extractor takes a plain media URL as well.

Every connection yt-dlp makes (the page, each redirect, the media, each HLS/DASH fragment)
goes through ``policy_proxy``, which applies ``urls``' policy and connects to the checked
address: yt-dlp never reaches private addresses unless MORAG_URL_ALLOWLIST permits them.
Its ffmpeg post-processing runs under ``ffmpeg_timeout`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from morag import urls
from morag.policy_proxy import ProxyLog, policy_proxy, ydl_proxy_options
from morag.processors.base import ProcessContext, ProcessingError
from morag.tools import ffmpeg_to_wav


def _deadline_hook(seconds: float) -> Callable[[dict[str, Any]], None]:
    """A progress hook that stops the download after ``seconds``: a server that drips a byte
    just under the socket timeout would otherwise keep a job for its whole time limit."""
    from yt_dlp.utils import DownloadError

    deadline = time.monotonic() + seconds

    def hook(_: dict[str, Any]) -> None:
        if time.monotonic() > deadline:
            raise DownloadError(f"the download took longer than {seconds:g}s and was stopped")

    return hook


def _ydl_options(dest: Path, settings: Any, proxy_url: str) -> dict[str, Any]:
    return {
        **ydl_proxy_options(proxy_url),
        "progress_hooks": [_deadline_hook(settings.tool_timeout)],
        "format": "bestaudio/best",
        "outtmpl": str(dest / "media.%(ext)s"),
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "socket_timeout": settings.url_timeout,
        "max_filesize": settings.max_upload_bytes,
        "retries": 2,
        "cachedir": False,
        # No FFmpegExtractAudio post-processor: yt-dlp runs ffmpeg without a time limit.
        # The audio is extracted below by morag.tools, which has one.
    }


def _resolved_urls(info: dict[str, Any]) -> list[str]:
    found = [info.get("url")]
    for fmt in info.get("requested_formats") or []:
        found.append(fmt.get("url"))
    return [u for u in found if isinstance(u, str) and u.startswith(("http://", "https://"))]


def _download_failure(url: str, exc: Exception, refusals: ProxyLog) -> str:
    if refusals.refused:
        return f"URL refused while yt-dlp fetched {url}: {refusals.refused[0]}"
    return f"yt-dlp could not download {url}: {exc}"


DOWNLOADED = 0.3  # the job's progress once the media is downloaded and converted


class YoutubeProcessor:
    content_type = "youtube"
    fetches_url = True

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        from yt_dlp import YoutubeDL
        from yt_dlp.utils import DownloadError

        from morag.processors.registry import transcriber

        url = ctx.source_url
        if not url:
            raise ProcessingError("the youtube processor needs a URL")
        allow = ctx.settings.url_allowlist
        urls.check_url(url, allow)
        dest = path / "ytdlp"
        dest.mkdir(parents=True, exist_ok=True)
        with policy_proxy(allow, ctx.settings.url_timeout) as (proxy_url, refusals):
            try:
                with YoutubeDL(_ydl_options(dest, ctx.settings, proxy_url)) as ydl:
                    info = ydl.extract_info(url, download=False)
                    if info is None:
                        raise ProcessingError(f"yt-dlp found no media at {url}")
                    if info.get("_type") == "playlist":
                        raise ProcessingError("playlists are not supported: submit one video URL")
                    for media_url in _resolved_urls(info):
                        urls.check_url(media_url, allow)
                    info = ydl.process_ie_result(info, download=True)
            except DownloadError as exc:
                raise ProcessingError(_download_failure(url, exc, refusals)) from exc
            except urls.UrlRefused as exc:
                raise ProcessingError(f"URL refused: {exc}") from exc
        media = sorted(p for p in dest.glob("media.*") if not p.name.endswith(".part"))
        if not media:
            raise ProcessingError(f"yt-dlp produced no media for {url}")
        wav = ffmpeg_to_wav(
            media[0],
            path / "audio.wav",
            timeout=ctx.settings.tool_timeout,
            what="extracting the audio (ffmpeg)",
        )
        # Download and extraction: the first 30 %; the transcript: the rest.
        ctx.report_progress(DOWNLOADED)
        result = transcriber().process(wav, options, ctx.nested(DOWNLOADED, 1.0))
        meta = result.setdefault("metadata", {})
        for key in ("title", "uploader", "webpage_url", "extractor", "upload_date"):
            if info.get(key):
                meta[key] = info[key]
        meta["url"] = url
        meta["downloader"] = "yt-dlp"
        return result
