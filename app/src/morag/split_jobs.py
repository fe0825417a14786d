"""A long recording transcribed in pieces by idle workers: the I/O around morag.splitting.

The worker that claimed the job decides (the recording's length, ``options.split``, the idle
slots of its queue in the live heartbeats), finds silences near the cut points with
faster-whisper's VAD, writes the pieces as WAV files into the shared uploads directory under
server-made ids, and creates one internal "piece" job per piece but the first (same queue,
the job's options, ``parent_id`` set, route code ``split_piece``). It transcribes the first
piece itself, then waits for the others: a piece that failed, was cancelled, is still
queued (no worker took it) or whose worker died is taken back and transcribed here, so a
lost piece costs time, never the job. The job's lease stays alive meanwhile: its worker's
supervisor refreshes it as for any running job. The pieces' results are merged into one
transcript; piece files and records are cleaned up whatever happens.

The pieces are written from the decoded samples (16 kHz mono, 16-bit PCM) with no ffmpeg: the
cut lands on the exact sample chosen in the silence, and no second decode of the upload is
needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import redis

from morag import files, fleet, jobs, splitting
from morag.celery_app import dispatch
from morag.job_record import TERMINAL, JobRecord, JobStatus, Route, Source
from morag.processors.base import ProcessContext, ProcessingError, SplitOutcome, Transcribe
from morag.runtime import Runtime

log = logging.getLogger("morag.split")

SPLIT_PIECE = "split_piece"  # route code of a piece job
POLL = 0.2  # seconds between looks at the pieces while waiting
PROGRESS_READ_EVERY = 1.0  # seconds between reads of the pieces' progress while transcribing
PIECE_RECORD_TTL = 600  # a merged job's piece records stay this long, for inspection
WRITE_CHUNK = 1 << 20  # samples per write of a piece file


class JobSplitter:
    """The ``ProcessContext.split`` hook of one job attempt (morag.processors.base.Splitter)."""

    def __init__(self, rt: Runtime, record: JobRecord, *, queue: str, owner: str) -> None:
        self.rt = rt
        self.record = record
        self.queue = queue
        self.owner = owner
        self.worker = owner.rpartition("/")[0] or owner
        self.task_id = record.task_id

    def __call__(
        self,
        audio: Any,
        rate: int,
        options: dict[str, Any],
        transcribe: Transcribe,
        ctx: ProcessContext,
    ) -> SplitOutcome:
        threshold = self.rt.settings.split_min_seconds
        duration = len(audio) / rate
        requested = options.get("split")
        requested = requested if isinstance(requested, bool) else None
        if self.record.parent_id:
            return SplitOutcome(None, "a piece of a split job")
        why_not = splitting.wanted(requested, duration, threshold)
        if why_not is not None:
            return SplitOutcome(None, why_not)
        try:
            beats = fleet.read_heartbeats(self.rt.redis)
        except redis.RedisError as exc:  # splitting is an optimisation: run whole
            return SplitOutcome(None, f"the fleet could not be read ({exc}): runs whole")
        free = splitting.free_slots(beats, self.queue, self.worker, self.task_id)
        plan = splitting.plan(requested, duration, threshold, free)
        if plan.pieces < 2:
            return SplitOutcome(None, plan.reason)
        spans = self._cut(
            audio, rate, plan.pieces, splitting.min_piece_seconds(threshold, requested)
        )
        if len(spans) < 2:
            return SplitOutcome(None, "no silence near the cut points: runs whole")
        log.info("job %s: %.0f s in %d pieces (%s)", self.task_id, duration, len(spans), plan)
        result = self._run(audio, rate, spans, options, transcribe, ctx)
        result["metadata"]["split"]["reason"] = plan.reason
        return SplitOutcome(result, plan.reason)

    # -- cutting ------------------------------------------------------------------------
    @staticmethod
    def _cut(audio: Any, rate: int, pieces: int, shortest: float) -> list[tuple[int, int]]:
        """Pieces (sample ranges) cut in the silence VAD finds nearest each ideal cut. VAD
        runs only on a window around each cut point, not on the whole recording."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        vad = VadOptions(
            min_silence_duration_ms=splitting.VAD_MIN_SILENCE_MS,
            speech_pad_ms=splitting.VAD_SPEECH_PAD_MS,
        )
        total = len(audio)
        cuts = []
        for target in splitting.targets(total, pieces):
            lo, hi = splitting.search_window(target, total, rate, shortest)
            found = get_speech_timestamps(audio[lo:hi], vad, sampling_rate=rate)
            speech = [(lo + s["start"], lo + s["end"]) for s in found]
            min_gap = int(splitting.MIN_GAP_SECONDS * rate)
            cuts.append(splitting.choose_cut(target, lo, hi, speech, min_gap))
        return splitting.ranges(total, cuts, int(0.2 * shortest * rate))

    @staticmethod
    def _write(samples: Any, rate: int, path: Path) -> tuple[str, int]:
        """``samples`` (float32, -1..1) as a 16-bit mono WAV file at ``path``, written whole
        or not at all; its SHA-256 and size."""
        digest = hashlib.sha256()
        partial = path.with_name(f".{path.name}.part")
        header = splitting.wav_header(len(samples), rate)
        digest.update(header)
        size = len(header)
        try:
            with open(partial, "wb") as out:
                out.write(header)
                for at in range(0, len(samples), WRITE_CHUNK):
                    chunk = np.clip(np.rint(samples[at : at + WRITE_CHUNK] * 32768), -32768, 32767)
                    data = chunk.astype("<i2").tobytes()
                    digest.update(data)
                    out.write(data)
                    size += len(data)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return digest.hexdigest(), size

    # -- running the pieces ---------------------------------------------------------------
    def _run(
        self,
        audio: Any,
        rate: int,
        spans: list[tuple[int, int]],
        options: dict[str, Any],
        transcribe: Transcribe,
        ctx: ProcessContext,
    ) -> dict[str, Any]:
        store, settings = self.rt.store, self.rt.settings
        count = len(spans)
        seconds = [(s / rate, e / rate) for s, e in spans]
        piece_options = {**options, "split": False}
        progress = splitting.Progress([float(e - s) for s, e in spans])
        ids = [jobs.new_id() for _ in spans[1:]]
        index_of = {pid: i for i, pid in enumerate(ids, start=1)}
        uploads: list[str] = []
        done: dict[int, splitting.Piece] = {}
        last_read = {"at": time.monotonic()}

        def read_progress() -> None:
            pending = [pid for pid in ids if index_of[pid] not in done]
            for rec in store.get_many(pending):
                if rec.status == JobStatus.running:
                    ctx.report_progress(progress.update(index_of[rec.task_id], rec.progress))

        def here(index: int) -> splitting.Piece:
            """Transcribe piece ``index`` in this worker."""

            def report(fraction: float) -> None:
                ctx.report_progress(progress.update(index, fraction))
                now = time.monotonic()
                if now - last_read["at"] >= PROGRESS_READ_EVERY:
                    last_read["at"] = now
                    with contextlib.suppress(redis.RedisError):  # progress is a hint
                        read_progress()

            changes: dict[str, Any] = {"split": None, "report_progress": report}
            if index:
                # Live readers get the first piece's segments as they come, the others'
                # in recording order once the pieces before them are done (relay).
                changes["report_segment"] = lambda segment: None
            path = ctx.work_dir / f"piece-{index}.wav"
            start, end = spans[index]
            self._write(audio[start:end], rate, path)
            try:
                result = transcribe(path, piece_options, replace(ctx, **changes))
            finally:
                path.unlink(missing_ok=True)
            ctx.report_progress(progress.update(index, 1.0))
            return splitting.Piece(*seconds[index], result, self.worker)

        relayed = {"next": 1}

        def relay() -> None:
            """The segments of the pieces after the first, in the recording's time and
            order, to the job's live readers: each piece once every piece before it is
            done, wherever it ran (the first piece streams its segments live)."""
            while relayed["next"] in done:
                piece = done[relayed["next"]]
                for seg in piece.result.get("segments") or []:
                    ctx.report_segment(splitting.shift_segment(seg, piece.start, piece.end))
                relayed["next"] += 1

        try:
            self._adopt(ids)
            records = []
            for index, (pid, (start, end)) in enumerate(zip(ids, spans[1:], strict=True), 1):
                file_id = jobs.new_id()  # 32 hex digits: a valid upload id
                uploads.append(file_id)
                path = files.upload_path(settings.uploads_dir, file_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                sha, size = self._write(audio[start:end], rate, path)
                records.append(
                    self._piece_record(pid, index, file_id, sha, size, piece_options, seconds)
                )
            store.create_all(records)
            for rec in records:
                dispatch(store, rec.task_id, self.queue)
            done[0] = here(0)
            while len(done) < count:
                self._still_ours()
                index = self._collect(ids, index_of, done, progress, ctx)
                if index is not None:
                    done[index] = here(index)
                relay()
                if index is None and len(done) < count:
                    time.sleep(POLL)
            relay()
        finally:
            self._clean_up(ids, uploads)
        pieces = [done[i] for i in range(count)]
        limits = {
            name: int(options[name]) if options.get(name) is not None else None
            for name in ("max_line_width", "max_line_count")
        }
        formats = [f for f in options.get("subtitles") or [] if f in ("srt", "vtt")]
        return splitting.merge(pieces, duration=len(audio) / rate, formats=formats, limits=limits)

    def _piece_record(
        self,
        pid: str,
        index: int,
        file_id: str,
        sha: str,
        size: int,
        options: dict[str, Any],
        seconds: list[tuple[float, float]],
    ) -> JobRecord:
        start, end = seconds[index]
        label = f"piece {index + 1} of {len(seconds)} of job {self.task_id}"
        record = jobs.new_record(
            kind="process",
            content_type="audio",
            source=Source.upload(file_id=file_id, sha256=sha, size=size, filename=label),
            options=options,
            route=Route(
                queue=self.queue,
                gpu_requested=self.record.route.gpu_requested,
                code=SPLIT_PIECE,
                reason=f"{label} ({start:.1f} s to {end:.1f} s), on an idle worker of {self.queue}",
            ),
            metadata={"piece": {"job": self.task_id, "index": index, "start": start, "end": end}},
            task_id=pid,
        )
        record.parent_id = self.task_id
        record.force_cpu = self.record.force_cpu
        return record

    def _adopt(self, ids: list[str]) -> None:
        """Write the pieces' ids into the job (the API cancels them with it); pieces of an
        earlier attempt of the job (its worker died) are cancelled and their files removed."""
        earlier = self.rt.store.adopt_pieces(self.task_id, self.owner, ids)
        if earlier is None:
            raise ProcessingError("the job was cancelled or taken over before it was split")
        for rec in self.rt.store.get_many(earlier):
            self.rt.store.cancel(rec.task_id, "its job started over")
            if rec.upload_id:
                files.remove_upload(self.rt.settings.uploads_dir, rec.upload_id)

    def _still_ours(self) -> None:
        rec = self.rt.store.get(self.task_id)
        if rec is None or rec.status != JobStatus.running or rec.owner != self.owner:
            raise ProcessingError("the job ended while its pieces ran (cancelled or taken over)")

    def _collect(
        self,
        ids: list[str],
        index_of: dict[str, int],
        done: dict[int, splitting.Piece],
        progress: splitting.Progress,
        ctx: ProcessContext,
    ) -> int | None:
        """Take the pieces that succeeded; return a piece to transcribe here (failed,
        cancelled, not taken by any worker, or its worker died), or None to wait."""
        store = self.rt.store
        pending = [pid for pid in ids if index_of[pid] not in done]
        by_id = {rec.task_id: rec for rec in store.get_many(pending)}
        live: set[str] | None = None
        for pid in pending:
            index, rec = index_of[pid], by_id.get(pid)
            if rec is None:
                return index  # expired or removed: nobody will finish it
            if rec.status == JobStatus.succeeded and rec.result is not None:
                worker = rec.attempts[-1].worker if rec.attempts else "unknown"
                result = rec.result.model_dump(mode="json")
                done[index] = splitting.Piece(*self._span(rec), result, worker)
                ctx.report_progress(progress.update(index, 1.0))
                continue
            if rec.status in TERMINAL:
                log.warning("job %s: piece %s %s; transcribed here", self.task_id, pid, rec.status)
                return index
            if rec.status == JobStatus.queued:
                if self._take_back(pid, None, "no worker took it; transcribed by its job's worker"):
                    return index
                continue
            holder = store.lease_owner(pid)
            if live is None:
                live = {str(b.get("name")) for b in fleet.read_heartbeats(self.rt.redis)}
            worker = rec.attempts[-1].worker if rec.attempts else ""
            if holder is None or worker not in live:
                why = f"its worker {worker} was lost; transcribed by its job's worker"
                if self._take_back(pid, holder, why):
                    log.warning("job %s: piece %s: %s", self.task_id, pid, why)
                    return index
                continue
            ctx.report_progress(progress.update(index, rec.progress))
        return None

    @staticmethod
    def _span(rec: JobRecord) -> tuple[float, float]:
        piece = rec.metadata.get("piece") or {}
        return float(piece["start"]), float(piece["end"])

    def _take_back(self, pid: str, holder_seen: str | None, reason: str) -> bool:
        """End a piece so that this worker transcribes it (JobStore.take_back_piece)."""
        return self.rt.store.take_back_piece(pid, holder_seen, reason)

    def _clean_up(self, ids: list[str], uploads: list[str]) -> None:
        """Pieces still running are cancelled (the job failed or was cancelled), their files
        removed, their records left to expire soon."""
        store, settings = self.rt.store, self.rt.settings
        try:
            for rec in store.get_many(ids):
                if rec.status not in TERMINAL:
                    store.cancel(rec.task_id, "its job ended")
            for pid in ids:
                store.expire(pid, PIECE_RECORD_TTL)
        except redis.RedisError as exc:  # they end and expire on their own
            log.warning("job %s: pieces not cleaned up (%s)", self.task_id, exc)
        for file_id in uploads:
            files.remove_upload(settings.uploads_dir, file_id)
