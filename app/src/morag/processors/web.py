"""Web pages: fetch the URL (size and time capped, every redirect re-checked, connected to
the checked address) and keep the main text as Markdown with trafilatura."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

from morag import urls
from morag.processors.base import ProcessContext, ProcessingError


def extract_main_text(html: str, url: str) -> tuple[str, dict[str, Any]]:
    import trafilatura

    content = trafilatura.extract(
        html,
        url=url,
        output_format="markdown",
        include_tables=True,
        include_links=False,
        favor_recall=True,
    )
    meta: dict[str, Any] = {}
    doc = trafilatura.extract_metadata(html, default_url=url)
    if doc is not None:
        for key in ("title", "author", "date", "sitename", "description"):
            value = getattr(doc, key, None)
            if value:
                meta[key] = value
    return (content or "").strip(), meta


def page_charset(content_type: str) -> str:
    """The charset named by the Content-Type header (UTF-8 if none); an unknown one is a
    clear job error, not a LookupError deep in the decoder."""
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip("\"'"):
            charset = value.strip().strip("\"'")
    try:
        return codecs.lookup(charset).name
    except LookupError:
        raise ProcessingError(
            f"the page declares an unknown character set {charset[:40]!r} "
            f"(Content-Type: {content_type[:200]})"
        ) from None


class WebProcessor:
    content_type = "web"
    fetches_url = True

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        if not ctx.source_url:
            raise ProcessingError("the web processor needs a URL (submit it with /process/url)")
        settings = ctx.settings
        page = path / "page.html"
        header = urls.download(
            ctx.source_url,
            page,
            allowlist=settings.url_allowlist,
            max_bytes=settings.web_max_bytes,
            timeout=settings.url_timeout,
            deadline=settings.web_fetch_deadline,
        )
        ctx.report_progress(0.5)
        raw = page.read_bytes()
        html = raw.decode(page_charset(header), errors="replace")
        content, meta = extract_main_text(html, ctx.source_url)
        if not content:
            raise ProcessingError(f"no main text found at {ctx.source_url}")
        meta.update(
            {
                "url": ctx.source_url,
                "http_content_type": header,
                "bytes": len(raw),
                "extractor": "trafilatura",
                "device": "cpu",
            }
        )
        return {"content": content, "metadata": meta}
