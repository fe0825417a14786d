"""Documents with docling: PDF, DOCX, PPTX, XLSX, HTML and Markdown to Markdown (tables kept).

PDFs go through docling's layout models when ``MORAG_DOCLING_ARTIFACTS_PATH`` points at
pre-staged model artifacts; without them (docling cannot fetch models offline) the PDF's
text layer is read with pypdf. ``metadata.pdf_pipeline`` says which path ran.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

from morag.processors.base import ProcessContext, ProcessingError

log = logging.getLogger("morag.processors.document")

_ZIP_KINDS = {"word/": "docx", "ppt/": "pptx", "xl/": "xlsx"}


def sniff_format(path: Path) -> str:
    """``pdf``, ``docx``, ``pptx``, ``xlsx``, ``html`` or ``md`` from the file's bytes."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise ProcessingError(f"the Office file is damaged: {exc}") from exc
        for prefix, kind in _ZIP_KINDS.items():
            if any(n.startswith(prefix) for n in names):
                return kind
        raise ProcessingError("a ZIP archive that is not a DOCX, PPTX or XLSX file")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "html"
    return "md"


def pdf_text_layer(path: Path) -> tuple[str, int]:
    """Markdown from a PDF's text layer, one section per page; and the page count."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(str(path), strict=False)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ProcessingError(f"cannot read the PDF: {exc}") from exc
    if not any(p.strip() for p in pages):
        raise ProcessingError(
            "the PDF has no text layer; scanned PDFs need docling's layout and OCR models "
            "(set MORAG_DOCLING_ARTIFACTS_PATH)"
        )
    parts = [f"## Page {i}\n\n{text.strip()}" for i, text in enumerate(pages, 1) if text.strip()]
    return "\n\n".join(parts), len(pages)


class DocumentProcessor:
    content_type = "document"
    fetches_url = False

    def __init__(self) -> None:
        self._converters: dict[tuple[str, str], Any] = {}

    def _converter(self, device: str, artifacts: Path | None) -> Any:
        key = (device, str(artifacts or ""))
        if key not in self._converters:
            from docling.datamodel.accelerator_options import AcceleratorOptions
            from docling.datamodel.base_models import InputFormat
            from docling.datamodel.pipeline_options import PdfPipelineOptions
            from docling.document_converter import DocumentConverter, PdfFormatOption

            formats = [
                InputFormat.DOCX,
                InputFormat.PPTX,
                InputFormat.XLSX,
                InputFormat.HTML,
                InputFormat.MD,
            ]
            options: dict[Any, Any] = {}
            if artifacts is not None:
                pdf = PdfPipelineOptions(
                    artifacts_path=str(artifacts),
                    do_ocr=False,
                    do_table_structure=True,
                    accelerator_options=AcceleratorOptions(device=device),
                )
                formats.append(InputFormat.PDF)
                options[InputFormat.PDF] = PdfFormatOption(pipeline_options=pdf)
            self._converters[key] = DocumentConverter(
                allowed_formats=formats, format_options=options
            )
        return self._converters[key]

    def _docling(self, path: Path, fmt: str, ctx: ProcessContext) -> tuple[str, dict[str, Any]]:
        # docling picks its backend from the file name: give the upload its real extension.
        named = ctx.work_dir / f"document.{fmt}"
        if named != path:
            named.unlink(missing_ok=True)
            named.symlink_to(path.resolve())
        converter = self._converter(ctx.device, ctx.settings.docling_artifacts_path)
        try:
            result = converter.convert(named, raises_on_error=True)
        except ProcessingError:
            raise
        except Exception as exc:  # docling wraps backend failures in its own errors
            if is_gpu_error(exc):
                raise
            raise ProcessingError(f"cannot convert the {fmt.upper()} file: {exc}") from exc
        doc = result.document
        meta: dict[str, Any] = {"converter": "docling"}
        pages = getattr(doc, "pages", None)
        if pages:
            meta["pages"] = len(pages)
        tables = getattr(doc, "tables", None)
        meta["tables"] = len(tables) if tables is not None else 0
        return doc.export_to_markdown(), meta

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        fmt = sniff_format(path)
        ctx.report_progress(0.1)
        if fmt == "pdf" and ctx.settings.docling_artifacts_path is None:
            content, pages = pdf_text_layer(path)
            meta: dict[str, Any] = {
                "converter": "pypdf",
                "pages": pages,
                "pdf_pipeline": "text-layer",
                "device": "cpu",
            }
        else:
            content, meta = self._docling(path, fmt, ctx)
            if fmt == "pdf":
                meta["pdf_pipeline"] = "docling-layout"
            meta["device"] = ctx.device
        meta["format"] = fmt
        return {"content": content.strip(), "metadata": meta}


def is_gpu_error(exc: BaseException) -> bool:
    from morag.processors.base import is_gpu_failure

    return is_gpu_failure(exc)
