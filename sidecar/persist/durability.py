"""Local durability: snapshot files + change log segments in one state directory (DESIGN §8).

Why this shape: memory alone loses every registration when both nodes restart. A periodic
full snapshot plus an append-only log of every change that won in the store (local or
replicated) is the file equivalent of full + incremental backups, restored automatically at
cold start with expired contacts dropped.

Directory layout (``state_dir``)::

    snapshot-<seq>.snap       full snapshot; the state at the moment log segment <seq> began
    snapshot-<seq>.snap.tmp   a snapshot being written (left over after a crash: ignored)
    changes-<seq>.log         change log segment <seq> (``<seq>`` is 12 zero-padded digits)

Every snapshot starts a new log segment, so a restore is: the newest *valid* snapshot, then
every segment whose seq is >= the snapshot's, in order. Re-applying a change the snapshot
already holds is a no-op under the store's conflict rule, so the overlap needs no care. A
process start also opens a fresh segment, so a damaged tail of the previous one never hides
later appends. Retention keeps the newest ``retention`` snapshots and the segments they need.

Fsync policy (``fsync``): appends always go to an in-memory buffer first (a few µs each);
``"always"`` writes and fsyncs once per event-loop iteration (group commit; once per change
before :meth:`Durability.start`), ``"interval"`` every ``fsync_interval_s``, ``"never"``
writes every ``fsync_interval_s`` but leaves fsync to the OS (survives a process crash, not a
power cut).

Wiring (the owner's side): call :meth:`Durability.record_put` with the tuple the store kept
for every put/refresh that won, :meth:`Durability.record_delete` for every delete that won.
Restore straight into the ``ContactStore`` (not through ``Replica``), so restored changes are
not logged or published again. ``store.drop`` (pruning) is not a logged change; call
``record_delete`` for it if a pruned contact must stay gone across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..model import DELETE_LEN, RECORD_LEN, make_record, now_ms
from ..replication.wire import WireError, check_change
from ..store import ContactStore
from .change_log import (
    LOG_HEADER_SIZE,
    ChangeLogWriter,
    Damage,
    PersistError,
    decode_change,
    decode_log_header,
    scan_frames,
)
from .snapshot_file import encode_chunks, encode_snapshot_header, read_snapshot

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("always", "interval", "never")
_SNAP_RE = re.compile(r"^snapshot-(\d{12})\.snap$")
_TMP_RE = re.compile(r"^snapshot-(\d{12})\.snap\.tmp$")
_LOG_RE = re.compile(r"^changes-(\d{12})\.log$")


def snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:012d}.snap"


def segment_name(seq: int) -> str:
    return f"changes-{seq:012d}.log"


@dataclass(slots=True)
class SnapshotInfo:
    path: Path
    log_seq: int  # segment started with this snapshot (0 for an export to an explicit path)
    records: int
    bytes: int
    seconds: float
    removed: list[Path] = field(default_factory=list)  # old files deleted by retention


@dataclass(slots=True)
class RestoreReport:
    """What a restore did; every problem found is listed, none is silently skipped."""

    snapshot_path: Path | None = None
    snapshot_records: int = 0
    skipped_snapshots: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    log_segments: list[Path] = field(default_factory=list)
    log_records: int = 0  # intact log records read (puts + deletes + bad)
    puts_applied: int = 0  # snapshot + log puts that won (expired ones included)
    deletes_applied: int = 0
    expired_dropped: int = 0  # records already expired at restore time (not loaded)
    bad_records: int = 0  # intact frames whose content is no valid change
    damage: list[Damage] = field(default_factory=list)  # corrupt/truncated log data
    temp_files_ignored: list[Path] = field(default_factory=list)
    contacts: int = 0  # contacts in the store afterwards
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.skipped_snapshots or self.damage or self.bad_records)

    def as_dict(self) -> dict:
        """JSON-friendly view for the admin command (sc_restore)."""
        return {
            "snapshot": str(self.snapshot_path) if self.snapshot_path else None,
            "snapshot_records": self.snapshot_records,
            "skipped_snapshots": [{"path": str(p), "error": e}
                                  for p, e in self.skipped_snapshots],
            "log_segments": [str(p) for p in self.log_segments],
            "log_records": self.log_records,
            "puts_applied": self.puts_applied,
            "deletes_applied": self.deletes_applied,
            "expired_dropped": self.expired_dropped,
            "bad_records": self.bad_records,
            "damage": [{"path": d.path, "offset": d.offset, "kind": d.kind,
                        "bytes_dropped": d.bytes_dropped, "records_dropped": d.records_dropped,
                        "detail": d.detail} for d in self.damage],
            "temp_files_ignored": [str(p) for p in self.temp_files_ignored],
            "contacts": self.contacts,
            "seconds": round(self.seconds, 3),
            "clean": self.clean,
        }


@dataclass(slots=True)
class DurabilityStats:
    """Counters for sc_status and /metrics."""

    changes_logged: int = 0
    syncs: int = 0
    snapshots: int = 0
    errors: int = 0
    lost_changes: int = 0  # buffered changes dropped because the log could not be written
    last_error: str = ""
    last_snapshot_ms: int = 0


class Durability:
    """Owns one state directory: appends changes, writes snapshots, restores, prunes."""

    def __init__(self, state_dir: Path | str, node_id: int = 0, fsync: str = "interval",
                 fsync_interval_s: float = 0.1, snapshot_interval_s: float = 300.0,
                 retention: int = 3, buffer_limit: int = 4 << 20) -> None:
        if fsync not in FSYNC_POLICIES:
            raise PersistError("config", f"fsync policy {fsync!r} is not one of "
                                         f"{', '.join(FSYNC_POLICIES)}")
        if retention < 1:
            raise PersistError("config", "retention must keep at least one snapshot")
        if fsync_interval_s <= 0:
            raise PersistError("config", "fsync_interval_s must be > 0")
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PersistError("io", f"cannot create state directory {self.dir}: {exc}") from None
        self.node_id = node_id
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.retention = retention
        self.buffer_limit = buffer_limit
        self.stats = DurabilityStats()
        self._log: ChangeLogWriter | None = None
        self._always = fsync == "always"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync_scheduled = False
        self._task: asyncio.Task | None = None
        self._snapshot_running = False
        self._snapshot_wanted = False  # set after a log write failure
        self._retry_open_at = 0.0

    # ------------------------------------------------------------------ appending (hot path)
    def record_put(self, rec: tuple) -> None:
        """Log a contact version that won in the store (put or refresh result)."""
        w = self._log or self._reopen()
        if w is None:
            self.stats.lost_changes += 1
            return
        try:
            w.append(rec)
        except PersistError as exc:
            self._log_failed(exc)
            return
        self.stats.changes_logged += 1
        if self._always:
            self._want_sync()

    def record_delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
                      handle: int) -> None:
        """Log a delete that won in the store (same tuple as the wire DELETE)."""
        w = self._log or self._reopen()
        if w is None:
            self.stats.lost_changes += 1
            return
        try:
            w.append((aor, bid, callid, cseq, last_modified, handle))
        except PersistError as exc:
            self._log_failed(exc)
            return
        self.stats.changes_logged += 1
        if self._always:
            self._want_sync()

    def flush(self, sync: bool | None = None) -> None:
        """Write buffered changes to the OS; fsync unless the policy is "never" (or *sync*
        says otherwise). Errors are counted, logged and end the segment, never raised."""
        w = self._log
        if w is None:
            return
        try:
            if sync if sync is not None else self.fsync != "never":
                w.sync()
                self.stats.syncs += 1
            else:
                w.write_out()
        except PersistError as exc:
            self._log_failed(exc)

    tick = flush  # what the periodic task calls every fsync_interval_s

    def _want_sync(self) -> None:
        if self._loop is None:
            self.flush(True)
        elif not self._sync_scheduled:
            self._sync_scheduled = True
            self._loop.call_soon(self._group_sync)

    def _group_sync(self) -> None:
        self._sync_scheduled = False
        self.flush(True)

    def _open_log(self) -> ChangeLogWriter:
        seq = self._next_seq()
        self._log = ChangeLogWriter(self.dir / segment_name(seq), self.node_id, seq, now_ms(),
                                    self.buffer_limit)
        self._fsync_dir()
        return self._log

    def _reopen(self) -> ChangeLogWriter | None:
        """Open a segment from the append path: failures are counted, not raised into the
        store's hot path, and retried at most once a second."""
        if time.monotonic() < self._retry_open_at:
            return None
        try:
            return self._open_log()
        except PersistError as exc:
            self._retry_open_at = time.monotonic() + 1.0
            self.stats.errors += 1
            self.stats.last_error = str(exc)
            log.error("cannot open a change log segment: %s", exc)
            return None

    def _log_failed(self, exc: PersistError, w: ChangeLogWriter | None = None) -> None:
        """A failed write may leave a torn frame: end this segment and start a fresh one
        at the next append, so later changes stay readable. The lost changes are counted
        and the next periodic snapshot runs early to cover them."""
        w = w or self._log
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        if w is not None:
            self.stats.lost_changes += w.pending_changes
            if self._log is w:
                self._log = None
            with contextlib.suppress(PersistError, OSError):
                w.close(sync=False, discard=True)
        self._snapshot_wanted = True
        log.error("change log write failed, segment closed: %s", exc)

    def _next_seq(self) -> int:
        top = 0
        for name in self._names():
            m = _SNAP_RE.match(name) or _LOG_RE.match(name) or _TMP_RE.match(name)
            if m:
                top = max(top, int(m.group(1)))
        if self._log is not None:
            top = max(top, self._log.seq)
        return top + 1

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.dir)
        except OSError as exc:
            raise PersistError("io", f"cannot list {self.dir}: {exc}") from None

    def _fsync_dir(self) -> None:
        """Make a create/rename durable (the directory entry itself must reach the disk)."""
        try:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise PersistError("io", f"cannot fsync directory {self.dir}: {exc}") from None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, store: ContactStore | None = None) -> None:
        """Start the periodic flush task (and periodic snapshots of *store* if given)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(store), name="durability")

    async def stop(self) -> None:
        """Stop the task, then write and fsync everything buffered and close the segment."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop = None
        self.close()

    def close(self) -> None:
        w, self._log = self._log, None
        if w is not None:
            try:
                w.close(sync=True)
            except PersistError as exc:
                self._log_failed(exc, w)

    async def _run(self, store: ContactStore | None) -> None:
        next_snapshot = time.monotonic() + self.snapshot_interval_s
        while True:
            await asyncio.sleep(self.fsync_interval_s)
            self.flush()
            due = store is not None and self.snapshot_interval_s > 0 and (
                time.monotonic() >= next_snapshot or self._snapshot_wanted)
            if due and not self._snapshot_running:
                try:
                    await self.snapshot_async(store)
                except PersistError as exc:
                    self.stats.errors += 1
                    self.stats.last_error = str(exc)
                    log.error("periodic snapshot failed: %s", exc)
                next_snapshot = time.monotonic() + self.snapshot_interval_s

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, store: ContactStore, path: Path | str | None = None) -> SnapshotInfo:
        """Write a full snapshot now (blocking). Without *path* it goes into the state
        directory, starts a new log segment and applies retention; with *path* it is an
        export (sc_snapshot PATH) that touches neither log nor retention."""
        steps = self._snapshot_steps(store, path)
        try:
            while True:
                next(steps)
        except StopIteration as done:
            return done.value

    async def snapshot_async(self, store: ContactStore,
                             path: Path | str | None = None) -> SnapshotInfo:
        """Same as :meth:`snapshot`, yielding to the event loop between chunks. The record
        list is copied (and the log rotated) at the start, so changes made meanwhile go to
        the new segment and the file is one consistent cut."""
        steps = self._snapshot_steps(store, path)
        try:
            while True:
                next(steps)
                await asyncio.sleep(0)
        except StopIteration as done:
            return done.value
        finally:
            steps.close()  # cancelled mid-write: removes the temp file

    def _snapshot_steps(self, store: ContactStore,
                        path: Path | str | None) -> Iterator[None]:
        if self._snapshot_running:
            raise PersistError("busy", "a snapshot is already being written")
        self._snapshot_running = True
        try:
            started = time.monotonic()
            records = store.records()
            if path is None:
                self.close()  # fsyncs the old segment: it is complete up to this cut
                seq = self._open_log().seq
                final = self.dir / snapshot_name(seq)
            else:
                seq = 0
                final = Path(path)
            tmp = final.with_name(final.name + ".tmp")
            size = 0
            try:
                with open(tmp, "wb") as f:
                    head = encode_snapshot_header(self.node_id, now_ms(), seq, len(records))
                    f.write(head)
                    size += len(head)
                    for chunk in encode_chunks(records):
                        f.write(chunk)
                        size += len(chunk)
                        yield
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                if path is None:
                    self._fsync_dir()
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if isinstance(exc, OSError):
                    raise PersistError("io", f"cannot write snapshot {final}: {exc}") from None
                raise
            removed = self._apply_retention() if path is None else []
            self.stats.snapshots += 1
            self.stats.last_snapshot_ms = now_ms()
            self._snapshot_wanted = False
            return SnapshotInfo(final, seq, len(records), size, time.monotonic() - started,
                                removed)
        finally:
            self._snapshot_running = False

    def _listing(self) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]],
                                list[tuple[int, Path]]]:
        """(snapshots, log segments, temp files), each sorted by seq ascending."""
        snaps, logs, tmps = [], [], []
        for name in self._names():
            if m := _SNAP_RE.match(name):
                snaps.append((int(m.group(1)), self.dir / name))
            elif m := _LOG_RE.match(name):
                logs.append((int(m.group(1)), self.dir / name))
            elif m := _TMP_RE.match(name):
                tmps.append((int(m.group(1)), self.dir / name))
        return sorted(snaps), sorted(logs), sorted(tmps)

    def _apply_retention(self) -> list[Path]:
        """Keep the newest ``retention`` snapshots and every segment from the oldest kept
        one on (a fallback to an older snapshot needs them); drop the rest and stale temps."""
        snaps, logs, tmps = self._listing()
        if not snaps:
            return []
        kept = snaps[-self.retention:]
        oldest = kept[0][0]
        doomed = [p for _, p in snaps[:-self.retention]]
        doomed += [p for seq, p in logs if seq < oldest]
        doomed += [p for _, p in tmps]  # only ours could be live, and it just finished
        removed = []
        for p in doomed:
            try:
                p.unlink()
                removed.append(p)
            except OSError as exc:
                log.warning("retention could not remove %s: %s", p, exc)
        return removed

    # ------------------------------------------------------------------ restore
    def restore(self, store: ContactStore, path: Path | str | None = None) -> RestoreReport:
        """Load contacts into *store*.

        Without *path* (cold start): the newest valid snapshot in the state directory, falling
        back to older ones if it is damaged or of a newer format, then every later log
        segment; problems are listed in the report, never raised. With *path* (sc_restore
        PATH): exactly that snapshot file, and a damaged or foreign file raises
        :class:`PersistError` before anything is applied.
        """
        # A million fresh tuples would trigger dozens of full GC passes that find nothing
        # (contact tuples hold no cycles); pausing the collector cuts restore time by ~25%.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._restore(store, path)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _restore(self, store: ContactStore, path: Path | str | None) -> RestoreReport:
        started = time.monotonic()
        report = RestoreReport()
        now = store.clock()
        if path is not None:
            p = Path(path)
            self._verify_snapshot(p)
            self._load_snapshot(store, p, report, now)
            report.contacts = len(store)
            report.seconds = time.monotonic() - started
            return report
        snaps, logs, tmps = self._listing()
        report.temp_files_ignored = [p for _, p in tmps]
        base = 0
        for _, p in reversed(snaps):
            try:
                self._verify_snapshot(p)
                base = self._load_snapshot(store, p, report, now)
                break
            except PersistError as exc:
                log.error("skipping snapshot: %s", exc)
                report.skipped_snapshots.append((p, str(exc)))
        for seq, p in logs:
            if seq >= base:
                self._replay_segment(store, p, report, now)
        report.contacts = len(store)
        report.seconds = time.monotonic() - started
        return report

    def _verify_snapshot(self, p: Path) -> None:
        """Check framing and checksums of the whole file before any record is applied, so
        a damaged snapshot is skipped as a whole rather than half loaded."""
        try:
            with open(p, "rb") as f:
                for _ in read_snapshot(f, str(p), decode=False):
                    pass
        except OSError as exc:
            raise PersistError("io", f"cannot read {p}: {exc}") from None

    def _load_snapshot(self, store: ContactStore, p: Path, report: RestoreReport,
                       now: float) -> int:
        put_many = store.put_many
        applied = expired = count = 0
        try:
            with open(p, "rb", buffering=1 << 20) as f:
                it = read_snapshot(f, str(p))
                header = next(it)
                for chunk in it:
                    count += len(chunk)
                    done, dropped = put_many(chunk, now)
                    applied += done
                    expired += dropped
        except OSError as exc:
            raise PersistError("io", f"cannot read {p}: {exc}") from None
        finally:
            report.puts_applied += applied
            report.expired_dropped += expired
        report.snapshot_path = p
        report.snapshot_records = count
        return header.log_seq

    def _replay_segment(self, store: ContactStore, p: Path, report: RestoreReport,
                        now: float) -> None:
        report.log_segments.append(p)
        try:
            data = p.read_bytes()
        except OSError as exc:
            report.damage.append(Damage(str(p), 0, "io", 0, 0, str(exc)))
            return
        try:
            decode_log_header(data[:LOG_HEADER_SIZE], str(p))
        except PersistError as exc:
            # A segment cut inside its header is a crash right after creating it.
            report.damage.append(Damage(str(p), 0, exc.reason, len(data),
                                        0 if len(data) < LOG_HEADER_SIZE else 1, str(exc)))
            return
        payloads, damage = scan_frames(memoryview(data)[LOG_HEADER_SIZE:], LOG_HEADER_SIZE,
                                       str(p))
        if damage is not None:
            log.error("change log %s damaged at offset %d (%s): %d bytes, >= %d records "
                      "dropped", p, damage.offset, damage.kind, damage.bytes_dropped,
                      damage.records_dropped)
            report.damage.append(damage)
        put, delete = store.put, store.delete
        report.log_records += len(payloads)
        for payload in payloads:
            try:
                c = decode_change(payload)
                n = check_change(c)
            except (PersistError, WireError):
                report.bad_records += 1
                continue
            if n == RECORD_LEN:
                exp = c[5]
                if exp and exp <= now:
                    report.expired_dropped += 1
                report.puts_applied += put(c)
            elif n == DELETE_LEN:
                report.deletes_applied += delete(*c)
            else:
                report.bad_records += 1


# ---------------------------------------------------------------------- measurements
def synthetic_records(n: int, expires: int | None = None, node_id: int = 1) -> list[tuple]:
    """Realistic-size contacts for benchmarks and tests (distinct AORs, NAT'd, with UA)."""
    exp = int(time.time()) + 3600 if expires is None else expires
    lm = now_ms()
    base = (node_id << 56) | (1 << 24)
    return [make_record(aor=f"sip:user{i}@example.com", uri=f"sip:user{i}@10.{i >> 16 & 255}."
                        f"{i >> 8 & 255}.{i & 255}:5060;transport=udp",
                        callid=f"{i:08x}-5f3a9c@10.0.0.1", cseq=i % 1000 + 1, expires=exp,
                        handle=base + i, last_modified=lm,
                        received=f"sip:198.51.100.{i & 255}:{40000 + (i & 4095)}",
                        socket="udp:203.0.113.10:5060", user_agent="Yealink SIP-T46S 66.86",
                        flags=1, q=-1)
            for i in range(n)]


def measure_append_rate(n: int = 1_000_000, fsync_interval_s: float = 0.1,
                        directory: str | None = None) -> float:
    """Changes/s appended with fsync every *fsync_interval_s* (the fsyncs are inside the
    timed loop, and the final close fsyncs the rest)."""
    recs = synthetic_records(min(n, 20_000))
    m = len(recs)
    with tempfile.TemporaryDirectory(dir=directory) as d:
        dur = Durability(d, node_id=1, fsync="interval", fsync_interval_s=fsync_interval_s)
        put = dur.record_put
        clock = time.perf_counter
        started = clock()
        next_sync = started + fsync_interval_s
        for i in range(n):
            put(recs[i % m])
            if not i & 1023 and clock() >= next_sync:
                dur.tick()
                next_sync += fsync_interval_s
        dur.close()
        return n / (clock() - started)


def measure_restore(n: int = 200_000, log_changes: int = 0,
                    directory: str | None = None) -> tuple[float, int]:
    """Seconds to cold-restore *n* contacts from a snapshot (plus *log_changes* logged
    re-puts), and the number of contacts restored."""
    recs = synthetic_records(n)
    with tempfile.TemporaryDirectory(dir=directory) as d:
        dur = Durability(d, node_id=1)
        store = ContactStore()
        for r in recs:
            store.put(r)
        dur.snapshot(store)
        for r in recs[:log_changes]:
            dur.record_put(r)
        dur.close()
        fresh = ContactStore()
        started = time.perf_counter()
        Durability(d, node_id=1).restore(fresh)
        return time.perf_counter() - started, len(fresh)


__all__ = [
    "FSYNC_POLICIES",
    "Durability",
    "DurabilityStats",
    "RestoreReport",
    "SnapshotInfo",
    "measure_append_rate",
    "measure_restore",
    "segment_name",
    "snapshot_name",
    "synthetic_records",
]
