"""YouTube and other media URLs: yt-dlp downloads the audio, then the audio processor
transcribes it. yt-dlp's generic extractor takes a plain media URL as well.

The URL (and the media URL yt-dlp resolves it to) must pass ``urls.check_url`` first, so
yt-dlp never reaches private addresses unless MORAG_URL_ALLOWLIST permits them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morag import urls
from morag.processors.base import ProcessContext, ProcessingError


def _ydl_options(dest: Path, settings: Any) -> dict[str, Any]:
    return {
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
        "postprocessors": [
            {"key": "FFmpegExtractAudio", "preferredcodec": "wav", "preferredquality": "0"}
        ],
    }


def _resolved_urls(info: dict[str, Any]) -> list[str]:
    found = [info.get("url")]
    for fmt in info.get("requested_formats") or []:
        found.append(fmt.get("url"))
    return [u for u in found if isinstance(u, str) and u.startswith(("http://", "https://"))]


class YoutubeProcessor:
    content_type = "youtube"
    fetches_url = True

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        from yt_dlp import YoutubeDL
        from yt_dlp.utils import DownloadError

        from morag.processors.registry import get_processor

        url = ctx.source_url
        if not url:
            raise ProcessingError("the youtube processor needs a URL")
        allow = ctx.settings.url_allowlist
        urls.check_url(url, allow)
        dest = path / "ytdlp"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with YoutubeDL(_ydl_options(dest, ctx.settings)) as ydl:
                info = ydl.extract_info(url, download=False)
                if info is None:
                    raise ProcessingError(f"yt-dlp found no media at {url}")
                if info.get("_type") == "playlist":
                    raise ProcessingError("playlists are not supported: submit one video URL")
                for media_url in _resolved_urls(info):
                    urls.check_url(media_url, allow)
                info = ydl.process_ie_result(info, download=True)
        except DownloadError as exc:
            raise ProcessingError(f"yt-dlp could not download {url}: {exc}") from exc
        wavs = sorted(dest.glob("*.wav"))
        if not wavs:
            raise ProcessingError(f"yt-dlp produced no audio for {url}")
        ctx.report_progress(0.3)
        result = get_processor("audio").process(wavs[0], options, ctx)
        meta = result.setdefault("metadata", {})
        for key in ("title", "uploader", "webpage_url", "extractor", "upload_date"):
            if info.get(key):
                meta[key] = info[key]
        meta["url"] = url
        meta["downloader"] = "yt-dlp"
        return result
