"""Long recordings split across idle workers: where to cut, how many pieces, one transcript.

A recording of at least ``MORAG_SPLIT_MIN_SECONDS`` whose queue has idle workers is cut into
pieces that those workers transcribe in parallel (morag.split_jobs runs it: files, piece
jobs, waiting). Cuts fall only inside silence found by VAD near the ideal (equal-length)
cut points, so no word is cut or heard twice; each piece's segments and words are then
moved by the piece's offset and joined into one transcript.

Everything here is pure (no Redis, no files, no model): the I/O edge asks and acts.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from morag import subtitles

# Pieces are at least this long whatever the threshold: below it the per-piece overhead
# (a message, a claim, a file) is no longer small against the work.
MIN_PIECE_SECONDS = 10.0
# More pieces than this only multiply files and messages; 16 workers already cut a 60 min
# recording into sub-4-minute pieces.
MAX_PIECES = 16
# VAD looks for a silence this far either side of an ideal cut (seconds), and at most this
# share of the shortest piece, so two cuts' windows never overlap.
SEARCH_SECONDS = 30.0
SEARCH_SHARE = 0.4
# A gap between two speech regions (after the VAD's padding) must be this long to cut in.
MIN_GAP_SECONDS = 0.2
# The VAD settings used to find gaps: short pauses count as silence (faster-whisper's default
# of 2 s minimum silence would merge sentences into one region), little padding.
VAD_MIN_SILENCE_MS = 250
VAD_SPEECH_PAD_MS = 100


@dataclass(frozen=True)
class Plan:
    pieces: int  # 1: run whole
    reason: str


def wanted(requested: bool | None, duration: float, threshold: float) -> str | None:
    """Why ``duration`` seconds are not split, before anything is asked of the fleet; None:
    worth asking. ``requested`` is ``options.split`` (None: decide by the threshold)."""
    if requested is False:
        return "turned off by options.split"
    if threshold <= 0:
        return "turned off on this worker (MORAG_SPLIT_MIN_SECONDS=0)"
    if requested is None and duration < threshold:
        return f"auto: shorter than {threshold:g} s (MORAG_SPLIT_MIN_SECONDS)"
    return None


def min_piece_seconds(threshold: float, requested: bool | None = None) -> float:
    """The shortest piece: half the threshold (a recording just over it splits in two at
    most), or ``MIN_PIECE_SECONDS`` when the job asked for splitting whatever its length."""
    return MIN_PIECE_SECONDS if requested else max(threshold / 2, MIN_PIECE_SECONDS)


def plan(requested: bool | None, duration: float, threshold: float, free_slots: int) -> Plan:
    """How many pieces (this worker's included) for one job. ``free_slots``: job slots idle
    on the job's queue besides the one running this job."""
    why_not = wanted(requested, duration, threshold)
    if why_not is not None:
        return Plan(1, why_not)
    shortest = min_piece_seconds(threshold, requested)
    possible = int(duration // shortest)
    if possible < 2:
        return Plan(1, f"too short for two pieces of at least {shortest:g} s")
    if free_slots < 1:
        return Plan(1, "no idle worker on the queue: runs whole")
    pieces = min(1 + free_slots, possible, MAX_PIECES)
    return Plan(pieces, f"{pieces} pieces: {free_slots} idle worker slot(s) on the queue")


def free_slots(heartbeats: Iterable[Mapping[str, Any]], queue: str, me: str, task_id: str) -> int:
    """Idle job slots on ``queue`` from live heartbeats (``concurrency`` minus ``active``),
    without the slot of this job's own worker ``me`` (its heartbeat may predate the job)."""
    total = 0
    for beat in heartbeats:
        if queue not in (beat.get("consuming") or beat.get("queues") or ()):
            continue
        if "audio" not in (beat.get("processors") or ()):
            continue  # cannot take a piece (a piece is an audio job)
        active = set(beat.get("active") or ())
        if beat.get("name") == me:
            active.add(task_id)
        total += max(0, int(beat.get("concurrency") or 1) - len(active))
    return total


# -- where to cut ---------------------------------------------------------------------------


def targets(total: int, pieces: int) -> list[int]:
    """The ideal cut points (samples) for ``pieces`` equal pieces of ``total`` samples."""
    return [round(total * i / pieces) for i in range(1, pieces)]


def search_window(target: int, total: int, rate: int, shortest: float) -> tuple[int, int]:
    """The samples around ``target`` where VAD looks for a silence to cut in."""
    half = int(min(SEARCH_SECONDS, SEARCH_SHARE * shortest) * rate)
    return max(0, target - half), min(total, target + half)


def silences(speech: Sequence[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The gaps between the speech regions found in ``[lo, hi)``. The window's edges count
    as speech (what lies beyond them was not looked at), unless no speech was found at all:
    then the whole window is silent."""
    regions = sorted((max(lo, s), min(hi, e)) for s, e in speech if e > lo and s < hi)
    if not regions:
        return [(lo, hi)]
    gaps = []
    end = regions[0][1]
    for start, stop in regions[1:]:
        if start > end:
            gaps.append((end, start))
        end = max(end, stop)
    return gaps


def choose_cut(
    target: int, lo: int, hi: int, speech: Sequence[tuple[int, int]], min_gap: int
) -> int | None:
    """A cut in the middle of the silence (at least ``min_gap`` samples) nearest ``target``;
    None when the window holds no such silence."""
    gaps = [(a, b) for a, b in silences(speech, lo, hi) if b - a >= min_gap]
    if not gaps:
        return None
    a, b = min(gaps, key=lambda g: (abs((g[0] + g[1]) // 2 - target), g[0]))
    return (a + b) // 2


def ranges(total: int, cuts: Iterable[int | None], min_samples: int) -> list[tuple[int, int]]:
    """Pieces ``[start, end)`` from the cuts found (None: none found there). A cut that
    would leave a piece shorter than ``min_samples`` is dropped: that piece joins its
    neighbour."""
    points = [0]
    for cut in sorted(c for c in cuts if c is not None):
        if cut - points[-1] >= min_samples and total - cut >= min_samples:
            points.append(cut)
    points.append(total)
    return list(itertools.pairwise(points))


def wav_header(samples: int, rate: int) -> bytes:
    """The 44-byte header of a 16-bit mono PCM WAV file of ``samples`` samples."""
    data = samples * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16, b"data", data,
    )  # fmt: skip


# -- progress ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """The job's progress over its pieces, weighted by length; never goes backwards, also
    when a piece starts over elsewhere (its share stays at the best it reached)."""

    weights: list[float]
    done: list[float] = field(default_factory=list)
    last: float = 0.0

    def __post_init__(self) -> None:
        total = sum(self.weights) or 1.0
        self.weights = [w / total for w in self.weights]
        self.done = [0.0] * len(self.weights)

    def update(self, index: int, fraction: float) -> float:
        self.done[index] = max(self.done[index], min(max(fraction, 0.0), 1.0))
        combined = sum(w * f for w, f in zip(self.weights, self.done, strict=True))
        self.last = max(self.last, min(combined, 0.99))  # 1.0 is the recorded end's
        return self.last


# -- one transcript from the pieces -------------------------------------------------------------

NO_SPEECH = "no speech found"


@dataclass(frozen=True)
class Piece:
    """One transcribed piece: where it lies in the recording, and what it gave."""

    start: float  # seconds from the recording's start
    end: float
    result: Mapping[str, Any]
    worker: str


def _moved(value: float, offset: float, lo: float, hi: float) -> float:
    # Whisper may stamp a word a little past its piece's end: clamped to the piece, the
    # times stay in order across a seam.
    return round(min(max(value + offset, lo), hi), 3)


def shift_segment(seg: Mapping[str, Any], start: float, end: float) -> dict[str, Any]:
    """A piece's segment in the recording's time (the piece lies at ``start``..``end``)."""
    out = dict(seg)
    out["start"] = _moved(seg["start"], start, start, end)
    out["end"] = _moved(seg["end"], start, out["start"], end)
    if seg.get("words"):
        out["words"] = [
            {
                **w,
                "start": _moved(w["start"], start, start, end),
                "end": _moved(w["end"], start, start, end),
            }
            for w in seg["words"]
        ]
    if "seek" in seg:  # Whisper's frame index: 100 frames a second
        out["seek"] = int(seg["seek"]) + round(start * 100)
    return out


def merge(
    pieces: Sequence[Piece],
    *,
    duration: float,
    formats: Sequence[str] = (),
    limits: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """One result from the pieces' results (in recording order): segments and words moved by
    each piece's offset, segment ids renumbered, content, warnings and subtitles rebuilt,
    ``metadata.split`` saying how many pieces ran on how many workers."""
    segments: list[dict[str, Any]] = []
    for piece in sorted(pieces, key=lambda p: p.start):
        for seg in piece.result.get("segments") or []:
            moved = shift_segment(seg, piece.start, piece.end)
            if "id" in moved:
                moved["id"] = len(segments) + 1
            segments.append(moved)
    first = min(pieces, key=lambda p: p.start).result
    metadata = dict(first.get("metadata") or {})
    metadata["duration"] = round(duration, 3)
    speech = [(p.result.get("metadata") or {}).get("speech_duration") for p in pieces]
    if all(s is not None for s in speech):
        metadata["speech_duration"] = round(sum(speech), 3)
    else:
        metadata.pop("speech_duration", None)
    workers = sorted({p.worker for p in pieces})
    metadata["split"] = {"pieces": len(pieces), "workers": len(workers), "worker_names": workers}
    content = " ".join(s["text"] for s in segments if s.get("text")).strip()
    result: dict[str, Any] = {"content": content, "segments": segments, "metadata": metadata}
    warnings: list[str] = []
    for piece in pieces:  # a silent piece is no warning for the whole recording
        for w in piece.result.get("warnings") or []:
            if not w.startswith(NO_SPEECH) and w not in warnings:
                warnings.append(w)
    if not any(ch.isalnum() for ch in content):
        warnings.append(f"{NO_SPEECH} in {duration:.1f} s of audio: the transcript holds no words")
    if warnings:
        result["warnings"] = warnings
    if formats:
        lim = dict(limits or {})
        result["subtitles"] = {f: subtitles.render(f, segments, **lim) for f in formats}
    return result
