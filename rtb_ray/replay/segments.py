"""Sealed segments on disk: Arrow IPC files and a JSON manifest holding their checksums.

The directory's files are listed in docs/REPLAY.md ("On disk"). Every file is written to a hidden
temporary name (crc32 computed while writing), fsynced, renamed, and the directory fsynced; a
segment before the manifest that lists it. A crash thus leaves either no file under a segment
name or a complete one; a complete one the manifest does not list yet is read back in full on
open and adopted if it is a valid file of the store's layout, else set aside. Names starting
with "." or "_" are ignored by ``pyarrow.dataset``: a scan sees exactly the sealed segments.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from rtb_ray.trajectory import TrajectoryLayout, validate_record_batch

MANIFEST = "_manifest.json"
LOCK = "_lock"
FORMAT = "rtb-ray-replay"
VERSION = 1
_SEGMENT_NAME = re.compile(r"segment-(\d{8})\.arrow")


class CorruptSegmentWarning(UserWarning):
    """A segment failed its checksum or could not be read; it was skipped and set aside."""


@dataclass(frozen=True)
class Segment:
    file: str
    rows: int
    bytes: int
    first_id: int
    last_id: int
    crc32: int


class _Crc32Writer:
    """A binary file that checksums everything written through it (wrapped by pa.PythonFile)."""

    def __init__(self, f) -> None:
        self.f, self.crc32, self.closed = f, 0, False

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True  # the owner closes the real file


def _write_atomically(path: Path, write) -> int:
    """``write(file)`` to a hidden temporary name, fsync, rename onto ``path``; returns crc32."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            sink = _Crc32Writer(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: give the space back; nothing became visible
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # the rename is durable once the directory is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return sink.crc32


class SegmentDirectory:
    def __init__(self, path: Path | str, layout: TrajectoryLayout | None = None, *,
                 keep_bytes: int | None = None, keep_segments: int | None = None) -> None:
        """Open (or create) a store directory, recovering from any crash; see the module doc.
        Retention: after each seal the oldest segments are deleted while the segments hold more
        than ``keep_bytes`` bytes or number more than ``keep_segments`` (None: no limit); the
        newest segment always stays."""
        if keep_bytes is not None and keep_bytes < 1:
            raise ValueError(f"keep_bytes must be >= 1 (got {keep_bytes})")
        if keep_segments is not None and keep_segments < 1:
            raise ValueError(f"keep_segments must be >= 1 (got {keep_segments})")
        self.keep_bytes, self.keep_segments = keep_bytes, keep_segments
        self.deleted = 0  # segments deleted by retention since this directory was opened
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # one store per directory: a second one would delete the first one's temporary files
        self._lock_file = open(self.path / LOCK, "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._recover(layout)
        except BlockingIOError:
            self.close()
            raise RuntimeError(f"{self.path} is already open in another replay store") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory (the lock goes with the process too, even on SIGKILL)."""
        self._lock_file.close()

    def _recover(self, layout: TrajectoryLayout | None) -> None:
        self.layout = layout
        self.segments: list[Segment] = []
        self.next_id = self.next_segment = 0  # continued from the manifest and the files
        self.corrupt = 0  # segments set aside since this directory was opened
        for leftover in self.path.glob(".*.tmp"):  # a crash mid-write: never visible, drop
            leftover.unlink()
        manifest = self.path / MANIFEST
        changed = False
        if manifest.exists():
            try:
                self._load_manifest(json.loads(manifest.read_text()), layout)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                # the segments carry everything the manifest says: rebuild it from them
                self.layout, self.segments, self.next_id, self.next_segment = layout, [], 0, 0
                self._set_aside(MANIFEST, f"is unreadable ({type(e).__name__}: {e}); rebuilt "
                                          f"from the segments")
                self.corrupt -= 1  # not a segment
                changed = True
        changed |= self._adopt_orphans()
        # a crash between listing and deleting a segment leaves an old orphan: keep id order
        self.segments.sort(key=lambda s: s.first_id)
        for segment in [s for s in self.segments if not (self.path / s.file).exists()]:
            self._set_aside(segment.file, "is listed in the manifest but missing")
            changed = True
        if changed:
            self.write_manifest()

    # -- manifest ------------------------------------------------------------------------------
    def _load_manifest(self, manifest: dict, layout: TrajectoryLayout | None) -> None:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TypeError(f"not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:  # another version's: not ours to rebuild
            raise ValueError(f"{self.path / MANIFEST}: not a {FORMAT} v{VERSION} manifest")
        if manifest["layout"] is not None:  # None: nothing was ever sealed
            stored = TrajectoryLayout.from_json(manifest["layout"])
            if layout is not None:
                try:
                    stored.check(layout)
                except ValueError as e:
                    raise ValueError(f"{self.path} holds another layout: {e}") from None
            self.layout = stored
        self.segments = [Segment(**s) for s in manifest["segments"]]
        # ids continue after the largest stored one, whatever the manifest's counter says
        self.next_id = max([int(manifest["next_id"])] + [s.last_id + 1 for s in self.segments])
        self.next_segment = int(manifest["next_segment"])

    def write_manifest(self) -> None:
        manifest = {
            "format": FORMAT, "version": VERSION,
            "layout": None if self.layout is None else self.layout.to_json(),
            "next_id": self.next_id, "next_segment": self.next_segment,
            "segments": [asdict(s) for s in self.segments],
        }
        data = json.dumps(manifest, indent=1).encode()
        _write_atomically(self.path / MANIFEST, lambda f: f.write(data))

    # -- writing -------------------------------------------------------------------------------
    def write(self, batches: list[pa.RecordBatch], next_id: int) -> Segment:
        """Seal ``batches`` as the next segment and list it in the manifest."""
        schema = batches[0].schema
        if self.layout is None:
            self.layout = TrajectoryLayout.from_schema(schema)
        name = f"segment-{self.next_segment:08d}.arrow"

        def write_ipc(f) -> None:
            with pa.ipc.new_file(pa.PythonFile(f, mode="w"), schema) as writer:
                writer.write_table(pa.Table.from_batches(batches, schema))

        crc = _write_atomically(self.path / name, write_ipc)
        segment = self._list(name, pa.chunked_array([b.column("id") for b in batches]), crc)
        self.next_segment += 1
        self.next_id = max(self.next_id, next_id)
        expired = self._expired()
        self.segments = self.segments[len(expired):]
        self.write_manifest()  # unlisted before deleted: a crash in between leaves an orphan
        for old in expired:
            (self.path / old.file).unlink(missing_ok=True)
        self.deleted += len(expired)
        return segment

    @property
    def nbytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def _expired(self) -> list[Segment]:
        """The oldest segments past the retention limits (never the newest one)."""
        total, count = self.nbytes, len(self.segments)
        expired = []
        for segment in self.segments[:-1]:
            if not ((self.keep_bytes is not None and total > self.keep_bytes)
                    or (self.keep_segments is not None and count > self.keep_segments)):
                break
            expired.append(segment)
            total, count = total - segment.bytes, count - 1
        return expired

    def _list(self, file: str, ids: pa.ChunkedArray, crc: int) -> Segment:
        """Add a sealed file (rows with ids ``ids``) to the segments; ids continue after it."""
        segment = Segment(file, len(ids), (self.path / file).stat().st_size, ids[0].as_py(),
                          ids[-1].as_py(), crc)
        self.segments.append(segment)
        self.next_id = max(self.next_id, segment.last_id + 1)
        return segment

    # -- reading -------------------------------------------------------------------------------
    def _read(self, file: str) -> tuple[pa.Buffer, int]:
        with pa.OSFile(str(self.path / file)) as f:
            data = f.read_buffer()
        return data, zlib.crc32(data)

    def read(self, segment: Segment) -> pa.Table | None:
        """The verified rows of a segment, or None (with a warning) if it is corrupt."""
        try:
            data, crc = self._read(segment.file)
            if crc != segment.crc32:
                raise ValueError(f"checksum mismatch: crc32 {crc:#010x}, "
                                 f"manifest says {segment.crc32:#010x}")
            table = pa.ipc.open_file(data).read_all()
            if table.num_rows != segment.rows:
                raise ValueError(f"{table.num_rows} rows, manifest says {segment.rows}")
        except (OSError, pa.ArrowException, ValueError) as e:
            self._set_aside(segment.file, f"is corrupt ({e})")
            self.write_manifest()
            return None
        return table

    def verify_all(self) -> int:
        """Read every segment and set aside the corrupt ones; returns how many were."""
        before = self.corrupt
        for segment in list(self.segments):
            self.read(segment)
        return self.corrupt - before

    # -- recovery ------------------------------------------------------------------------------
    def _adopt_orphans(self) -> bool:
        listed = {s.file for s in self.segments}
        orphans = sorted(p.name for p in self.path.iterdir()
                         if _SEGMENT_NAME.fullmatch(p.name) and p.name not in listed)
        for file in orphans:
            number = int(_SEGMENT_NAME.fullmatch(file)[1])
            self.next_segment = max(self.next_segment, number + 1)  # never reuse a name
            try:
                data, crc = self._read(file)
                table = pa.ipc.open_file(data).read_all()
                table.validate(full=True)
                if table.num_rows == 0:
                    raise ValueError("no rows")
                for batch in table.to_batches():
                    validate_record_batch(batch, self.layout)
                if self.layout is None:
                    self.layout = TrajectoryLayout.from_schema(table.schema)
            except (OSError, pa.ArrowException, ValueError) as e:
                self._set_aside(file, f"is corrupt ({e})")
                continue
            self._list(file, table.column("id"), crc)
        return bool(orphans)

    def _set_aside(self, file: str, reason: str) -> None:
        """Skip a bad segment for good: unlist it, move its file (if any) aside, warn."""
        self.segments = [s for s in self.segments if s.file != file]
        self.corrupt += 1
        path, moved = self.path / file, ""
        if path.exists():
            aside = path.with_name(f"_corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{file}")
            os.replace(path, aside)
            moved = f", moved to {aside.name}"
        warnings.warn(f"replay file {path} {reason}: skipped{moved}", CorruptSegmentWarning,
                      stacklevel=3)
