"""When to transcribe with faster-whisper's batched pipeline, and with how big a batch.

``BatchedInferencePipeline`` cuts the audio at silences (Silero VAD) into pieces of at most
30 s and decodes several pieces at once: one encoder call and one beam search for the whole
batch. That pays where the hardware has parallelism left over after one piece (a GPU), and
measurably on CPU once a batch fills: on 2 cores, 148 s of speech went 1.07x to 1.48x faster
batched, 49 s (two pieces, plus the VAD's cost) 0.95x (docs/performance.md). So ``auto``
batches on CUDA from two pieces on, and on CPU from one full batch of pieces on.

Everything here is pure (no CUDA, no NVML, no model): the processor measures the free GPU
memory and the model size and asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# One batch piece is a 30 s window: audio shorter than that is one piece, nothing to batch.
PIECE_SECONDS = 30.0
MIN_BATCHED_SECONDS = PIECE_SECONDS
# faster-whisper's own default, used when the free memory is unknown (NVML missing).
DEFAULT_GPU_BATCH = 8
# On CPU the batch only shares the cores; more pieces than this only use more memory.
CPU_BATCH = 4
# On CPU, batching paid only with a full batch (measured: 49 s slower, 148 s faster).
CPU_MIN_BATCHED_SECONDS = CPU_BATCH * PIECE_SECONDS
MAX_BATCH = 32
# Memory one more batch piece needs, as a share of the model's weights. faster-whisper's
# benchmark (large-v2, fp16, beam 5): 4525 MB sequential, 6090 MB with batch_size=8, that is
# about 6 % of the 3.1 GB of weights per piece; twice that leaves room for longer outputs.
PIECE_SHARE_OF_MODEL = 0.125
MIN_PIECE_BYTES = 64 * 1024**2
# Free memory left alone: other processes on a shared GPU, allocator fragmentation.
FREE_MEMORY_USED = 0.75

# Sentence-like segments from a batched piece: a new segment after these, or when one
# grows past MAX_SEGMENT_SECONDS (Whisper's own segments are a few seconds long).
SENTENCE_END = (".", "?", "!", "\u3002", "\uff1f", "\uff01")  # and CJK full stop, ?, !
MAX_SEGMENT_SECONDS = 10.0


@dataclass(frozen=True)
class Plan:
    batched: bool
    batch_size: int | None
    reason: str


def batch_size_for(device: str, free_bytes: int | None, model_bytes: int) -> int:
    """How many 30 s pieces to decode at once on ``device`` with ``free_bytes`` of free
    accelerator memory (measured after the model is loaded; None: unknown)."""
    if device != "cuda":
        return CPU_BATCH
    if free_bytes is None:
        return DEFAULT_GPU_BATCH
    per_piece = max(int(model_bytes * PIECE_SHARE_OF_MODEL), MIN_PIECE_BYTES)
    return max(1, min(MAX_BATCH, int(free_bytes * FREE_MEMORY_USED) // per_piece))


def plan(
    requested: bool | None,
    device: str,
    duration: float,
    free_bytes: int | None,
    model_bytes: int,
) -> Plan:
    """Batched or sequential for one job. ``requested`` is the job's ``options.batched``
    (None: decide here)."""
    if requested is False:
        return Plan(False, None, "turned off by options.batched")
    size = batch_size_for(device, free_bytes, model_bytes)
    if requested is True:
        return Plan(True, size, "asked by options.batched")
    if device != "cuda":
        if duration < CPU_MIN_BATCHED_SECONDS:
            return Plan(
                False,
                None,
                f"auto: CPU and shorter than {CPU_MIN_BATCHED_SECONDS:.0f} s "
                "(batching measured no faster there)",
            )
        return Plan(True, size, f"auto: CPU and {CPU_MIN_BATCHED_SECONDS:.0f} s or longer")
    if duration < MIN_BATCHED_SECONDS:
        return Plan(False, None, f"auto: shorter than {MIN_BATCHED_SECONDS:.0f} s, one piece")
    return Plan(True, size, f"auto: CUDA and {MIN_BATCHED_SECONDS:.0f} s or longer")


def split_segment(seg: dict[str, Any], max_seconds: float = MAX_SEGMENT_SECONDS) -> list[dict]:
    """A batched piece (up to 30 s, one segment) as sentence-like segments, cut between
    words: after a sentence end, or before a word that would make it longer than
    ``max_seconds``. Needs ``seg["words"]``; other members are copied to every part."""
    words = seg.get("words") or []
    if not words:
        return [seg]
    groups: list[list[dict[str, Any]]] = [[]]
    for word in words:
        current = groups[-1]
        if current and word["end"] - current[0]["start"] > max_seconds:
            groups.append([])
        groups[-1].append(word)
        if word["word"].strip().endswith(SENTENCE_END):
            groups.append([])
    parts = []
    for group in (g for g in groups if g):
        part = dict(seg)
        part.update(
            start=group[0]["start"],
            end=group[-1]["end"],
            text="".join(w["word"] for w in group).strip(),
            words=group,
        )
        parts.append(part)
    return parts
