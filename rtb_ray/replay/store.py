"""The replay store: every rollout lands here and every gradient comes from here.

Rows live in a bounded ring of numpy columns (ring.py), oldest evicted first. With a directory,
a background thread seals them into Arrow segments (segments.py) and no row is overwritten before
it is on disk, so reopening the directory gives back the newest rows and continues the ids. One
lock guards the state; only the copy in, the index draw and the gather out run under it.

Bad input (docs/REPLAY.md):

- **rejected whole** — wrong type, missing/unexpected field, wrong column type, states or cond
  of another shape or dtype than the store's, nulls, unknown source, a batch too large for the
  capacity. The store is unchanged, ``rejected_batches`` counts it, ``insert`` returns
  ``REJECTED`` with a reason naming the field.
- **quarantined rows** — rows whose ``log_reward``, ``log_prior`` or ``log_behaviour`` is NaN or
  ±inf. They get ids, are counted (``quarantined_rows``) and kept aside in memory (the newest
  ``quarantine_capacity``, see ``quarantined()``), and are never sampled nor written to disk.
  The batch's other rows are inserted.

With ``group_size`` k > 1 the store keeps and samples whole groups of k rows (one condition
repeated k times, docs/REPLAY.md "Groups"): every group holds k consecutive sequence numbers
starting at a multiple of k, a batch whose size or groups are not whole is rejected, a
non-finite row quarantines its group, and ``sample`` draws groups.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa

from rtb_ray.replay.rate_limiter import RateLimiter
from rtb_ray.replay.ring import ColumnRing, RankIndex, SourceIndex
from rtb_ray.replay.samplers import Sampler, Uniform
from rtb_ray.replay.segments import SegmentDirectory
from rtb_ray.trajectory import (
    TrajectoryBatch,
    TrajectoryColumns,
    TrajectoryLayout,
    as_record_batch,
    columns_from_arrow,
    columns_from_batch,
)

DEFAULT_SEGMENT_BYTES = 64 << 20
COUNTERS = ("inserted", "sampled", "sampled_other", "evicted", "loaded", "rejected_batches",
            "quarantined_rows", "throttled_inserts", "sample_timeouts", "sealed_segments",
            "sealed_rows", "sealed_bytes", "seal_seconds")


class InsertStatus(str, Enum):
    INSERTED = "inserted"  # the finite rows are in (some may have been quarantined)
    THROTTLED = "throttled"  # timed out waiting for the learner (or the disk); nothing changed
    REJECTED = "rejected"  # bad batch; nothing changed


@dataclass(frozen=True)
class InsertResult:
    status: InsertStatus
    inserted: int = 0
    quarantined: int = 0
    first_id: int | None = None  # the batch's rows got ids first_id, first_id + 1, ... in order
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == InsertStatus.INSERTED

    def raise_for_status(self) -> "InsertResult":
        if self.status == InsertStatus.REJECTED:
            raise ValueError(f"batch rejected: {self.reason}")
        if self.status == InsertStatus.THROTTLED:
            raise TimeoutError(f"insert throttled: {self.reason}")
        return self


class SampleTimeout(TimeoutError):
    """Too little data to sample (or the writers lag the target ratio) until the timeout."""


class ReplayDiskError(RuntimeError):
    """Sealing a segment failed (a full disk, a lost directory): the store refuses inserts and
    samples from then on; the message, one line, says how many acknowledged rows are not on
    disk."""


class _Names(dict[str, int]):
    """The store-wide dictionary of run / worker names: name -> code, in order of arrival."""

    def recode(self, codes: np.ndarray, names: list[str]) -> np.ndarray | int:
        """A batch's codes (into its ``names``) as store codes, adding the new names: one int for
        a one-name batch (the usual case: one run, one worker), which the ring broadcasts."""
        store_codes = np.array([self.setdefault(name, len(self)) for name in names], np.int32)
        return int(store_codes[0]) if len(names) == 1 else store_codes[codes]


class _StoreRows:
    """The stored rows as samplers see them (samplers.Rows)."""

    def __init__(self, store: "ReplayStore", seqs: np.ndarray | None = None,
                 codes: tuple[int, ...] = ()) -> None:
        self._store, self._seqs, self._codes = store, seqs, codes
        self.count = store.size if seqs is None else len(seqs)

    def at(self, positions: np.ndarray) -> np.ndarray:
        return self._store._start + positions if self._seqs is None else self._seqs[positions]

    def ranked(self) -> np.ndarray:
        s = self._store
        ranked = s._ranks.ranked(s._ring, s._start, s._stop)
        if self._seqs is None:
            return ranked
        return ranked[np.isin(s._ring.meta["source"][ranked % s._ring.capacity], self._codes)]

    def of_sources(self, codes: tuple[int, ...]) -> "_StoreRows":
        s = self._store
        return _StoreRows(s, s._sources.rows_of(s._ring, codes, s._start, s._stop), codes)


class _Groups:
    """The stored rows as whole groups of k (samplers.Rows): each group is one item, named by
    its leader, the group's first row. Valid because groups are aligned (k consecutive sequence
    numbers from a multiple of k) and a group has one source, so any source subset of the rows
    is a concatenation of whole groups, oldest first."""

    def __init__(self, rows: _StoreRows, k: int) -> None:
        self._rows, self._k = rows, k
        self.count = rows.count // k

    def at(self, positions: np.ndarray) -> np.ndarray:
        return self._rows.at(positions * self._k)

    def ranked(self) -> np.ndarray:
        ranked = self._rows.ranked()
        return ranked[ranked % self._k == 0]  # groups ranked by their leader's log_reward

    def of_sources(self, codes: tuple[int, ...]) -> "_Groups":
        return _Groups(self._rows.of_sources(codes), self._k)


def _check_sizes(capacity_trajectories: int, group_size: int, seal_every_s: float | None,
                 segment_rows: int | None) -> None:
    """ReplayStore's size arguments, each refused with a ValueError naming it."""
    if capacity_trajectories < 1:
        raise ValueError(f"capacity_trajectories must be >= 1 (got {capacity_trajectories})")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 (got {group_size})")
    if capacity_trajectories < group_size:
        raise ValueError(f"capacity_trajectories={capacity_trajectories} holds no group of "
                         f"group_size={group_size} rows")
    if seal_every_s is not None and not 0 < seal_every_s < math.inf:
        raise ValueError(f"seal_every_s must be a positive number (got {seal_every_s})")
    if segment_rows is not None and segment_rows < 1:
        raise ValueError(f"segment_rows must be >= 1 (got {segment_rows})")


class ReplayStore:
    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        capacity_trajectories: int = 1_000_000,
        capacity_bytes: int | None = None,
        segment_rows: int | None = None,
        keep_bytes: int | None = None,
        keep_segments: int | None = None,
        seal_every_s: float | None = None,
        layout: TrajectoryLayout | None = None,
        run: str = "",
        samples_per_insert: float | None = None,
        error_buffer: float | None = None,
        min_size_to_sample: int = 1,
        sampler: Sampler | None = None,
        seed: int = 0,
        quarantine_capacity: int = 1024,
        group_size: int = 1,
    ) -> None:
        """A store of at most ``capacity_trajectories`` rows and ``capacity_bytes`` bytes (of
        all columns). ``directory``: where sealed segments go (None: memory only); an existing
        store directory is reopened. ``segment_rows``: rows per segment (default ≈ 64 MiB);
        ``keep_bytes`` / ``keep_segments``: how much of it stays on disk (segments.py);
        ``seal_every_s``: also seal what is pending this often (None: only full segments), which
        bounds what a crash loses to that many seconds of inserts.
        ``layout``: the states' shape and dtype, else taken from the directory or the first
        insert. ``run``: the run name written with rows inserted as TrajectoryBatch. The rate
        limiter (rate_limiter.py): ``samples_per_insert`` (None: no ratio) with
        ``error_buffer``, and ``min_size_to_sample``. ``sampler``: the default sampler
        (uniform); ``seed`` makes sampling deterministic.
        ``group_size`` k: rows come in groups of k that share one ``cond`` and one source
        (conditional rollouts repeat each condition k times). Inserts must be whole groups,
        a non-finite row quarantines its group, and ``sample(n)`` (n a multiple of k) returns
        n/k whole groups, each's rows contiguous, drawn by the sampler as one item each. The
        capacity and ``segment_rows`` are rounded down to multiples of k (segment_rows at least
        k)."""
        _check_sizes(capacity_trajectories, group_size, seal_every_s, segment_rows)
        self.run = run
        self.group_size = group_size
        self.sampler = sampler or Uniform()
        self._capacity_trajectories, self._capacity_bytes = capacity_trajectories, capacity_bytes
        self._segment_rows_wanted = segment_rows
        self._limiter = RateLimiter(samples_per_insert, error_buffer, min_size_to_sample)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # any change of sizes, counters, state
        self._counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        # the rows: _allocate sets the ring and the sizes that follow from it (layout known)
        self._ring: ColumnRing | None = None
        self._segment_rows = self._max_batch_rows = 0
        self._ranks, self._sources = RankIndex(), SourceIndex()
        self._runs, self._workers = _Names(), _Names()
        self._start = self._stop = 0  # the rows held have sequence numbers [start, stop)
        self._next_id = 0
        # quarantined rows as one-row batches: maxlen keeps the newest quarantine_capacity
        self._quarantine: deque[pa.RecordBatch] = deque(maxlen=quarantine_capacity)
        # the disk: _open sets the directory and starts the sealer thread
        self._disk: SegmentDirectory | None = None
        self._disk_lock = threading.Lock()  # the manifest has one writer at a time
        self._sealed = 0  # rows below this sequence number are on disk
        self._flush_to = 0
        self._seal_every_s = seal_every_s
        self._pending_since = 0.0  # when the oldest row not on disk was inserted
        self._closing = False
        self._seal_error: BaseException | None = None
        if directory is not None:
            self._open(SegmentDirectory(directory, layout, keep_bytes=keep_bytes,
                                        keep_segments=keep_segments))
        elif layout is not None:
            self._allocate(layout)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._stop - self._start

    @property
    def layout(self) -> TrajectoryLayout | None:
        return None if self._ring is None else self._ring.layout

    @property
    def capacity(self) -> int | None:
        """Rows the store holds at most (known once the layout is)."""
        return None if self._ring is None else self._ring.capacity

    def _allocate(self, layout: TrajectoryLayout) -> None:
        # every size below is a multiple of k, which keeps groups aligned (docs/REPLAY.md)
        k = self.group_size
        row_nbytes = ColumnRing.row_nbytes(layout)
        rows = self._capacity_trajectories
        if self._capacity_bytes is not None:
            rows = min(rows, self._capacity_bytes // row_nbytes)
        rows -= rows % k
        if rows < 1:
            what = "row" if k == 1 else f"group of group_size={k} rows"
            raise ValueError(f"capacity_bytes={self._capacity_bytes} holds no {what} of "
                             f"{row_nbytes} bytes")
        if self._limiter.min_size_to_sample > rows:
            raise ValueError(f"min_size_to_sample={self._limiter.min_size_to_sample} is more "
                             f"than the capacity ({rows} rows)")
        segment_rows = self._segment_rows_wanted
        if segment_rows is None:
            segment_rows = min(max(1, DEFAULT_SEGMENT_BYTES // row_nbytes), max(1, rows // 2))
        segment_rows = max(k, segment_rows - segment_rows % k)
        if (self._disk is not None and self._segment_rows_wanted is not None
                and segment_rows > max(k, rows // 2)):
            raise ValueError(f"segment_rows={segment_rows} must be at most half the capacity "
                             f"({rows} rows)")
        self._segment_rows = segment_rows
        # with a directory, unsealed rows (at most segment_rows - k once the sealer has caught
        # up, as both are multiples of k) may not be overwritten
        self._max_batch_rows = rows if self._disk is None else rows - segment_rows + k
        self._ring = ColumnRing(layout, rows)

    def _open(self, disk: SegmentDirectory) -> None:
        """Take the opened store directory, reload its rows and start the sealer."""
        self._disk = disk
        self._next_id = self._disk.next_id
        try:
            if self._disk.layout is not None:
                self._allocate(self._disk.layout)
                self._load()
        except BaseException:
            self._disk.close()  # release the directory
            raise
        self._sealer = threading.Thread(target=self._seal_loop, name="replay-sealer", daemon=True)
        self._sealer.start()

    def _load(self) -> None:
        """Reload the newest sealed rows, up to capacity (checksums verified)."""
        tables, rows = [], 0
        for segment in reversed(list(self._disk.segments)):
            if rows >= self._ring.capacity:
                break
            table = self._disk.read(segment)  # None, with a warning, if corrupt
            if table is not None:
                tables.append(table)
                rows += table.num_rows
        if not tables:
            return
        table = pa.concat_tables(tables[::-1])
        keep = min(table.num_rows, self._ring.capacity)
        # whole groups only: segments end on group boundaries, so the newest multiple of k rows
        # start on one (a directory written with another group_size: the best we can do)
        keep -= keep % self.group_size
        table = table.slice(table.num_rows - keep)
        for batch in table.to_batches():
            self._write(columns_from_arrow(batch, self.layout))
        self._sealed = self._stop
        self._counters["loaded"] = self._stop
        self._limiter.warm_start(self.size)

    # -- insert --------------------------------------------------------------------------------
    def insert(self, batch: TrajectoryBatch | pa.RecordBatch | pa.Table, *, worker: str = "",
               timeout: float | None = None) -> InsertResult:
        """Insert trajectories; waits (up to ``timeout`` seconds, None: no limit) while the rate
        limiter or the sealing of segments holds writers back, then returns THROTTLED. Arrow
        input carries its own run and worker; ids are always assigned by the store."""
        try:
            rows = self._columns(batch, worker)
            if self.group_size > 1:
                self._check_groups(rows)
        except ValueError as e:
            with self._lock:
                return self._reject(str(e))
        scores = (rows.log_reward, rows.log_prior, rows.log_behaviour)
        # the usual case, in three reductions: a sum is finite only if every term is (one that
        # overflows takes the exact path below, which finds nothing to quarantine)
        all_finite = all(math.isfinite(a.sum()) for a in scores)
        if not all_finite:
            finite = np.logical_and.reduce([np.isfinite(a) for a in scores])
            if self.group_size > 1:  # a bad row takes its whole group with it
                finite = finite.reshape(-1, self.group_size).all(axis=1).repeat(self.group_size)
            all_finite = bool(finite.all())
        good = rows if all_finite else rows.take(finite)
        with self._lock:
            self._check_open()
            try:
                if self._ring is None:  # the first batch fixes the layout
                    self._allocate(rows.layout)
                elif not self._ring.holds(rows):  # the full check only to name what differs
                    self.layout.check(rows.layout)
            except ValueError as e:
                return self._reject(str(e))
            if len(good) > self._max_batch_rows:
                return self._reject(f"{len(good)} rows is more than the {self._max_batch_rows} "
                                    f"this store takes in one batch (capacity {self.capacity})")
            if len(good) and not self._changed.wait_for(lambda: self._may_insert(len(good)),
                                                        timeout):
                self._counters["throttled_inserts"] += 1
                return InsertResult(InsertStatus.THROTTLED, reason=self._why_throttled(timeout))
            self._check_open()
            first_id = self._next_id
            self._next_id += len(rows)
            ids = np.arange(first_id, self._next_id, dtype=np.int64)
            if len(good):
                if self._stop == self._sealed:
                    self._pending_since = time.monotonic()
                self._write(good, ids if all_finite else ids[finite])
                self._limiter.inserted += len(good)
                self._counters["inserted"] += len(good)
            if not all_finite:
                self._keep_aside(replace(rows.take(~finite), id=ids[~finite]))
            self._changed.notify_all()
        return InsertResult(InsertStatus.INSERTED, len(good), len(rows) - len(good), first_id)

    def _columns(self, batch: object, worker: str) -> TrajectoryColumns:
        """Numpy views of the batch, validated (ValueError naming the field)."""
        if isinstance(batch, TrajectoryBatch):
            return columns_from_batch(batch, run=self.run, worker=worker)
        if isinstance(batch, (pa.RecordBatch, pa.Table)):
            return columns_from_arrow(as_record_batch(batch), self.layout)
        raise ValueError(f"expected a TrajectoryBatch or a pyarrow RecordBatch/Table, "
                         f"got {type(batch).__name__}")

    def _check_groups(self, rows: TrajectoryColumns) -> None:
        """Raise a ValueError unless ``rows`` is whole groups: a multiple of k rows, and the k
        rows of each group share their source and (byte for byte) their cond."""
        k, n = self.group_size, len(rows)
        if n % k:
            raise ValueError(f"{n} rows is not a multiple of group_size={k}")
        if n == 0:
            return
        columns = {"source": rows.source}
        if rows.cond is not None:
            cond = np.ascontiguousarray(rows.cond).reshape(n, -1)
            columns["cond"] = cond.view(np.uint8)  # bytes: a repeated NaN matches itself
        for name, values in columns.items():
            grouped = values.reshape(n // k, k, -1)
            differs = (grouped != grouped[:, :1]).any(axis=(1, 2))
            if differs.any():
                g = int(differs.argmax())
                raise ValueError(f"field {name!r} differs within group {g} (rows {g * k}.."
                                 f"{g * k + k - 1}): the group_size={k} rows of a group must "
                                 f"share one {name}")

    def _reject(self, reason: str) -> InsertResult:
        self._counters["rejected_batches"] += 1
        return InsertResult(InsertStatus.REJECTED, reason=reason)

    def _may_insert(self, rows: int) -> bool:
        if self._closing or self._seal_error is not None:
            return True  # wake up to raise
        if not self._limiter.can_insert(self.size):
            return False
        # never overwrite a row that is not on disk yet
        return self._disk is None or self._stop + rows - self._ring.capacity <= self._sealed

    def _why_throttled(self, timeout: float | None) -> str:
        if not self._limiter.can_insert(self.size):
            return (f"no room within {timeout}s: the learner lags (samples_per_insert="
                    f"{self._limiter.samples_per_insert}, error {self._limiter.error:.0f} > "
                    f"error_buffer={self._limiter.error_buffer})")
        return (f"no room within {timeout}s: {self._stop - self._sealed} rows wait to be "
                f"sealed to disk")

    def _write(self, rows: TrajectoryColumns, ids: np.ndarray | None = None) -> None:
        """Append rows to the ring (with store ids ``ids``, else their own); under the lock."""
        self._ring.write(self._stop, rows, **({} if ids is None else {"id": ids}),
                         run=self._runs.recode(rows.run, rows.run_names),
                         worker=self._workers.recode(rows.worker, rows.worker_names))
        self._stop += len(rows)
        evicted = max(0, self._stop - self._ring.capacity - self._start)
        self._start += evicted
        self._counters["evicted"] += evicted

    def _keep_aside(self, rows: TrajectoryColumns) -> None:
        self._counters["quarantined_rows"] += len(rows)
        batch = rows.to_arrow()
        first = max(0, batch.num_rows - self._quarantine.maxlen)  # older ones would drop out
        self._quarantine.extend(batch.slice(i, 1) for i in range(first, batch.num_rows))

    def quarantined(self) -> pa.Table:
        """The newest quarantined rows (non-finite log_reward / log_prior / log_behaviour)."""
        with self._lock:
            batches = list(self._quarantine)
        return pa.Table.from_batches(batches) if batches else pa.table({})

    # -- sample --------------------------------------------------------------------------------
    def sample(self, n: int, *, sampler: Sampler | None = None, timeout: float | None = None,
               rate_limited: bool = True) -> TrajectoryBatch:
        """``n`` trajectories drawn with replacement (ids in ``extras["id"]``); waits up to
        ``timeout`` seconds (None: no limit) for the rate limiter, then raises SampleTimeout.
        ``rate_limited=False``, for readers other than the learner (backward rollouts): wait only
        for one row, neither count toward the samples-per-insert ratio nor are held back by it.
        With ``group_size`` k > 1: ``n`` must be a multiple of k; n/k whole groups, each's k rows
        contiguous and in insertion order, the groups in the sampler's (random) order."""
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        k = self.group_size
        if n % k:
            raise ValueError(f"n={n} is not a multiple of group_size={k}: samples are whole "
                             f"groups")
        sampler = sampler or self.sampler
        can_sample = self._limiter.can_sample if rate_limited else (lambda size: size > 0)
        with self._lock:
            if not self._changed.wait_for(lambda: self._closing or self._seal_error is not None
                                          or can_sample(self.size), timeout):
                self._counters["sample_timeouts"] += 1
                why = (self._limiter.why_not_sample(self.size) if rate_limited
                       else "the store is empty")
                raise SampleTimeout(f"no sample within {timeout}s: {why}")
            self._check_open()
            if k == 1:
                seqs = sampler.draw(_StoreRows(self), n, self._rng)
            else:  # draw group leaders, then take each leader's group
                leaders = sampler.draw(_Groups(_StoreRows(self), k), n // k, self._rng)
                seqs = (leaders[:, None] + np.arange(k)).reshape(-1)
            arrays = self._ring.gather(seqs)
            if rate_limited:
                self._limiter.sampled += n
            self._counters["sampled" if rate_limited else "sampled_other"] += n
            self._changed.notify_all()
        return self._as_columns(arrays).to_batch()

    def to_table(self) -> pa.Table:
        """A copy of the rows held in memory, oldest first (store ids, run and worker names)."""
        with self._lock:
            if self._ring is None:
                return pa.table({})
            rows = self._as_columns(self._ring.gather(np.arange(self._start, self._stop)))
        return pa.Table.from_batches([rows.to_arrow()])

    def _as_columns(self, arrays: dict[str, np.ndarray]) -> TrajectoryColumns:
        return TrajectoryColumns(**{"cond": None, **arrays}, run_names=list(self._runs),
                                 worker_names=list(self._workers))

    # -- sealing -------------------------------------------------------------------------------
    def _seal_range(self) -> tuple[int, int] | None:
        """The next rows to seal: a full segment, or on flush/close what is pending. Both ends
        are multiples of group_size (so are sealed, stop and segment_rows): a segment holds
        whole groups, which is what lets a reopened store reload whole groups."""
        pending = self._stop - self._sealed
        partial = (self._closing or self._flush_to > self._sealed
                   or self._seal_wait() == 0)
        if pending and (pending >= self._segment_rows or partial):
            return self._sealed, self._sealed + min(pending, self._segment_rows)
        return None

    def _seal_wait(self) -> float | None:
        """Seconds until the pending rows are due to be sealed by age (None: not by age)."""
        if self._seal_every_s is None or self._stop == self._sealed:
            return None
        return max(0.0, self._pending_since + self._seal_every_s - time.monotonic())

    def _seal_loop(self) -> None:
        """Background thread: write full segments (and, on flush/close or every
        ``seal_every_s``, the partial one)."""
        while True:
            with self._lock:
                while not (self._closing or self._seal_range() is not None):
                    self._changed.wait(self._seal_wait())
                span = self._seal_range()
                if span is None:
                    return  # closing, all sealed
                # rows >= self._sealed are never overwritten, so these views stay valid
                pieces = [self._as_columns(v) for v in self._ring.views(*span)]
                next_id = self._next_id
            t0 = time.perf_counter()
            try:
                with self._disk_lock:
                    segment = self._disk.write([p.to_arrow() for p in pieces], next_id)
            except BaseException as e:  # disk full, permissions: surface it to writers
                with self._lock:
                    self._seal_error = e
                    self._changed.notify_all()
                return
            with self._lock:
                self._sealed = span[1]
                self._counters["seal_seconds"] += time.perf_counter() - t0
                self._counters["sealed_segments"] += 1
                self._counters["sealed_rows"] += segment.rows
                self._counters["sealed_bytes"] += segment.bytes
                self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Seal every row inserted so far (a short segment if needed); False on timeout."""
        if self._disk is None:
            return True
        with self._lock:
            self._check_open()
            self._flush_to = self._stop
            self._changed.notify_all()
            done = self._changed.wait_for(
                lambda: self._sealed >= self._flush_to or self._seal_error is not None, timeout)
            self._check_open()
            return done

    def verify_segments(self) -> int:
        """Check every segment on disk (open checks only those it reloads); sets aside and counts
        the corrupt ones."""
        if self._disk is None:
            return 0
        with self._disk_lock:
            return self._disk.verify_all()

    def _check_open(self) -> None:
        if self._seal_error is not None:
            raise self._disk_error()
        if self._closing:
            raise RuntimeError("the replay store is closed")

    def _disk_error(self) -> ReplayDiskError:
        return ReplayDiskError(
            f"sealing a replay segment to {self._disk.path} failed ({self._seal_error}); "
            f"{self._stop - self._sealed} acknowledged rows are not on disk")

    def close(self) -> None:
        """Seal what is left and stop; inserts and samples fail from now on. Raises if rows that
        inserts acknowledged could not be sealed (a failed disk): no silent loss."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        if self._disk is not None:
            self._sealer.join()
            self._disk.close()
            if self._seal_error is not None:
                raise self._disk_error()

    # -- counters ------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        with self._lock:
            row_nbytes = 0 if self._ring is None else ColumnRing.row_nbytes(self.layout)
            inserted = self._counters["inserted"]
            return {
                **self._counters,
                "size": self.size,
                "capacity": self.capacity or 0,
                "group_size": self.group_size,
                "nbytes": self.size * row_nbytes,
                "capacity_bytes": (self.capacity or 0) * row_nbytes,
                "unsealed_rows": self._stop - self._sealed if self._disk is not None else 0,
                "corrupt_segments": 0 if self._disk is None else self._disk.corrupt,
                "deleted_segments": 0 if self._disk is None else self._disk.deleted,
                "disk_bytes": 0 if self._disk is None else self._disk.nbytes,
                "next_id": self._next_id,
                "samples_per_insert": self._counters["sampled"] / inserted if inserted else 0.0,
                "rate_limiter_error": self._limiter.error,
            }
