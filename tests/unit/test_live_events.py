"""The OpenAI stream's deltas (morag.api.live): their concatenation is the transcript, and
after a GPU->CPU fallback the new attempt's deltas continue where the first stopped."""

from __future__ import annotations

from morag.api.live import _Deltas
from morag.live_events import PROGRESS, SEGMENT, LiveEvent, sse, valid_event_id


def seg(n: int, attempt: int, start: float, end: float, text: str) -> LiveEvent:
    return LiveEvent(f"{n}-0", SEGMENT, attempt, {"start": start, "end": end, "text": text})


def sent(events: list[LiveEvent]) -> str:
    deltas = _Deltas()
    return "".join(d for ev in events if (d := deltas.take(ev)) is not None)


def test_deltas_join_segments_as_the_transcript_does() -> None:
    events = [
        seg(1, 1, 0.0, 2.0, "One."),
        LiveEvent("2-0", PROGRESS, 1, {"progress": 0.4}),
        seg(3, 1, 2.0, 2.5, ""),  # no words: the transcript skips it too
        seg(4, 1, 2.5, 5.0, "Two."),
    ]
    assert sent(events) == "One. Two."


def test_a_new_attempt_continues_after_what_was_streamed() -> None:
    events = [
        seg(1, 1, 0.0, 2.0, "One."),
        seg(2, 1, 2.0, 4.0, "Two."),
        # The GPU failed; the CPU attempt starts over from 0 s.
        seg(3, 2, 0.0, 2.1, "One"),
        seg(4, 2, 2.1, 3.9, "Two"),
        seg(5, 2, 3.9, 6.0, "Three."),
        seg(6, 1, 4.0, 6.0, "late"),  # a write of the replaced attempt: ignored
        seg(7, 2, 6.0, 8.0, "Four."),
    ]
    assert sent(events) == "One. Two. Three. Four."


def test_sse_framing_and_event_ids() -> None:
    assert sse({"a": 1}, event="segment", event_id="5-0") == (
        'id: 5-0\nevent: segment\ndata: {"a":1}\n\n'
    )
    assert valid_event_id("1700000000000-3")
    assert not valid_event_id("1-a") and not valid_event_id("") and not valid_event_id(None)
