"""Real test inputs made on the spot: speech video, silent video, Office files, a PDF with a
text layer, a PNG with rendered text, web pages; and a loopback HTTP server for URLs."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import speak

DOCX_SENTENCE = "The lighthouse keeper painted the tower bright blue every spring."
PPTX_SENTENCE = "Our bakery sells sourdough bread made with wild yeast."
XLSX_WORD = "Pomegranate"
PDF_SENTENCE = "Honeybees communicate the location of flowers through a waggle dance."
PNG_TEXT = "INVOICE 4821 PAID"
WEB_SENTENCE = "The volcano on the island erupted last century and covered the village in ash."
VIDEO_SENTENCE = "The train to the mountains leaves at seven in the morning."

FILLER = (
    "Quarterly planning meetings take place in the main conference room. "
    "Parking permits must be renewed at the front desk before the end of the month. "
)


def _ffmpeg(*args: str) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not installed: run `make test` (it installs it)")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def speech_video(dest: Path, sentence: str = VIDEO_SENTENCE) -> Path:
    wav = speak(sentence, dest.with_suffix(".wav"))
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=320x240:rate=10",
        "-i",
        str(wav),
        "-shortest",
        "-c:v",
        "mpeg4",
        "-c:a",
        "aac",
        str(dest),
    )
    return dest


def silent_audio(dest: Path, seconds: int = 20) -> Path:
    """A quiet noise floor (seeded: the same every run): audio that decodes, nothing said."""
    noise = f"anoisesrc=d={seconds}:c=pink:a=0.0005:r=16000:s=7"
    _ffmpeg("-f", "lavfi", "-i", noise, str(dest))
    return dest


def silent_video(dest: Path) -> Path:
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=duration=2:size=160x120:rate=10",
        "-c:v",
        "mpeg4",
        str(dest),
    )
    return dest


def docx_file(dest: Path) -> Path:
    import docx

    doc = docx.Document()
    doc.add_heading("Harbour maintenance", 1)
    doc.add_paragraph(FILLER)
    doc.add_paragraph(DOCX_SENTENCE)
    table = doc.add_table(rows=3, cols=2)
    for r, (a, b) in enumerate([("item", "cost"), ("paint", "120"), ("brushes", "15")]):
        table.cell(r, 0).text, table.cell(r, 1).text = a, b
    doc.save(dest)
    return dest


def pptx_file(dest: Path) -> Path:
    from pptx import Presentation

    prs = Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[1])
    slide.shapes.title.text = "Bakery news"
    slide.placeholders[1].text = PPTX_SENTENCE
    prs.save(dest)
    return dest


def xlsx_file(dest: Path) -> Path:
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["fruit", "count"])
    ws.append([XLSX_WORD, 42])
    ws.append(["Quince", 7])
    wb.save(dest)
    return dest


def pdf_file(dest: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 8, FILLER, new_x="LMARGIN", new_y="NEXT")
    pdf.multi_cell(0, 8, PDF_SENTENCE, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(dest))
    return dest


def png_file(dest: Path, text: str = PNG_TEXT) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (900, 160), "white")
    ImageDraw.Draw(img).text((30, 40), text, fill="black", font=ImageFont.load_default(size=64))
    img.save(dest)
    return dest


def html_page(dest: Path, sentence: str = WEB_SENTENCE) -> Path:
    body = "".join(f"<p>{FILLER}</p>" for _ in range(2))
    dest.write_text(
        "<!DOCTYPE html><html><head><title>Island history</title></head><body>"
        "<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
        f"<article><h1>Island history</h1>{body}<p>{sentence}</p>"
        "<p>Fishing boats returned to the harbour a few years later.</p></article>"
        "<footer>Copyright the island museum</footer></body></html>"
    )
    return dest


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


# Sentences for long recordings (batched transcription, its benchmark): several 30 s pieces.
SENTENCES = (
    DOCX_SENTENCE,
    PPTX_SENTENCE,
    PDF_SENTENCE,
    WEB_SENTENCE,
    VIDEO_SENTENCE,
    *FILLER.strip().split(". "),
    "The children built a small wooden boat and sailed it across the pond.",
    "A thunderstorm knocked out the power for most of the afternoon.",
    "The museum opens a new exhibition about ancient maps next week.",
    "She planted tomatoes, peppers and beans in the garden behind the house.",
)


def long_speech(dest: Path, repeats: int = 1, pause: float = 0.8) -> Path:
    """Real espeak-ng speech of SENTENCES (about 50 s per repeat), a pause after each,
    as one 16 kHz mono WAV."""
    parts = dest.parent / f"{dest.stem}-parts"
    parts.mkdir(exist_ok=True)
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=22050:cl=mono",
        "-t",
        str(pause),
        str(parts / "p.wav"),
    )
    lines = []
    for i, sentence in enumerate(SENTENCES):
        speak(sentence.rstrip(".") + ".", parts / f"s{i}.wav")
        lines += [f"file 's{i}.wav'", "file 'p.wav'"]
    (parts / "list.txt").write_text("\n".join(lines * repeats) + "\n")
    _ffmpeg(
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(parts / "list.txt"),
        "-ar",
        "16000",
        str(dest),
    )
    return dest


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length (texts already normalised)."""
    ref, hyp = reference.split(), hypothesis.split()
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            substitution = previous[j - 1] + (ref_word != hyp_word)
            current[j] = min(previous[j] + 1, current[j - 1] + 1, substitution)
        previous = current
    return previous[-1] / max(len(ref), 1)
