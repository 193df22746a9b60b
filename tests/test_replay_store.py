"""The replay store: bad input, quarantine, FIFO eviction, persistence, corruption, queries."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from rtb_ray.replay import CorruptSegmentWarning, InsertStatus, ReplayDiskError, ReplayStore
from rtb_ray.replay.ring import ColumnRing
from rtb_ray.trajectory import (Source, TrajectoryBatch, TrajectoryLayout, columns_from_batch,
                                to_arrow)

STEPS, DIM = 10, 2


def batch(b: int, *, source: Source = Source.PRIOR, version: int = 0, seed: int = 0,
          steps: int = STEPS, dim: int = DIM) -> TrajectoryBatch:
    gen = torch.Generator().manual_seed(seed)
    return TrajectoryBatch.make(torch.randn(b, steps + 1, dim, generator=gen),
                                torch.randn(b, generator=gen), torch.randn(b, generator=gen),
                                torch.randn(b, generator=gen), source, version)


def held_ids(store: ReplayStore) -> list[int]:
    return store.to_table().column("id").to_pylist()


def unchanged(store: ReplayStore, before: dict) -> None:
    after = store.stats()
    for key in ("size", "inserted", "next_id", "quarantined_rows", "evicted"):
        assert after[key] == before[key], key


# -- bad input ---------------------------------------------------------------------------------
def test_bad_batches_are_rejected_whole_and_counted() -> None:
    store = ReplayStore(capacity_trajectories=100)
    assert store.insert(batch(10)).ok
    ids = held_ids(store)
    before = store.stats()
    good = to_arrow(batch(4))
    bad = {
        "'states'": batch(4, steps=STEPS + 1),  # another shape
        "missing field 'log_prior'": good.drop_columns(["log_prior"]),
        "field 'log_reward'": good.set_column(
            good.schema.get_field_index("log_reward"), "log_reward",
            pa.array(np.zeros(4))),  # float64
        "expected a TrajectoryBatch": {"states": np.zeros((4, 11, 2))},
        "more than the 100": batch(101),
    }
    for i, (message, data) in enumerate(bad.items()):
        result = store.insert(data)
        assert result.status == InsertStatus.REJECTED and message in result.reason
        with pytest.raises(ValueError, match="batch rejected"):
            result.raise_for_status()
        unchanged(store, before)
        assert store.stats()["rejected_batches"] == i + 1
    assert held_ids(store) == ids


def test_rows_with_non_finite_log_values_are_quarantined(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    data = batch(12, version=3)
    data.log_reward[[1, 4]] = torch.tensor([float("nan"), float("inf")])
    data.log_prior[7] = float("-inf")
    data.log_behaviour[9] = float("nan")
    result = store.insert(data, worker="w1")
    assert (result.status, result.inserted, result.quarantined) == (InsertStatus.INSERTED, 8, 4)
    assert store.stats()["quarantined_rows"] == 4 and store.size == 8

    bad_ids = [result.first_id + i for i in (1, 4, 7, 9)]
    aside = store.quarantined()
    assert aside.column("id").to_pylist() == bad_ids
    assert aside.column("worker").to_pylist() == ["w1"] * 4
    assert np.isnan(aside.column("log_reward").to_numpy()[0])
    assert sorted(held_ids(store)) == sorted(set(range(12)) - set(bad_ids))
    sampled = store.sample(2000).extras["id"].tolist()
    assert not set(sampled) & set(bad_ids)  # never sampled
    store.close()
    on_disk = ds.dataset(tmp_path, format="ipc").to_table()
    assert on_disk.num_rows == 8 and not set(on_disk.column("id").to_pylist()) & set(bad_ids)


def test_quarantine_keeps_only_the_newest_rows() -> None:
    store = ReplayStore(capacity_trajectories=100, quarantine_capacity=5)
    for i in range(3):
        data = batch(4, seed=i)
        data.log_reward[:] = float("nan")
        assert store.insert(data).quarantined == 4
    assert store.quarantined().column("id").to_pylist() == [7, 8, 9, 10, 11]
    assert store.stats()["quarantined_rows"] == 12 and store.size == 0


# -- capacity ----------------------------------------------------------------------------------
def test_fifo_eviction_at_row_capacity() -> None:
    store = ReplayStore(capacity_trajectories=100)
    for i in range(5):
        assert store.insert(batch(50, version=i, seed=i)).inserted == 50
    assert held_ids(store) == list(range(150, 250))  # the newest, oldest first
    assert store.to_table().column("policy_version").to_pylist() == [3] * 50 + [4] * 50
    stats = store.stats()
    assert (stats["size"], stats["evicted"], stats["inserted"]) == (100, 150, 250)
    assert set(store.sample(5000).extras["id"].tolist()) == set(range(150, 250))


def test_ring_gathers_rows_by_sequence_numbers_far_beyond_its_capacity() -> None:
    # A long run's sequence numbers outgrow the ring by many orders of magnitude; a gather must
    # still be one modulo per row (numpy's take(mode="wrap") loops s / capacity times per row:
    # here ~10¹¹ iterations, so this test would not finish).
    b = batch(5, seed=3)
    rows = columns_from_batch(b)
    ring = ColumnRing(rows.layout, capacity=7)
    start = 10**12 + 3  # rows land in slots 3..6 and 0 (wrapping)
    ring.write(start, rows)
    got = ring.gather(np.array([start + 4, start, start + 2]))
    np.testing.assert_array_equal(got["states"], b.states.numpy()[[4, 0, 2]])
    np.testing.assert_array_equal(got["log_reward"], b.log_reward.numpy()[[4, 0, 2]])


def test_fifo_eviction_at_byte_capacity_and_memory_is_allocated_once() -> None:
    layout = TrajectoryLayout((STEPS + 1, DIM))
    row = ColumnRing.row_nbytes(layout)
    store = ReplayStore(capacity_trajectories=10_000, capacity_bytes=37 * row + row // 2)
    for i in range(4):
        store.insert(batch(20, seed=i))
    stats = store.stats()
    assert stats["capacity"] == 37 and stats["size"] == 37 and stats["evicted"] == 43
    assert stats["nbytes"] <= stats["capacity_bytes"] <= 37 * row + row // 2
    ring = store._ring  # what is really allocated
    allocated = sum(a.nbytes for a in ring.tensors.values()) + ring.meta.nbytes
    assert allocated <= 37 * row + row // 2
    assert held_ids(store) == list(range(43, 80))


def test_memory_stays_bounded_under_a_long_insert_loop() -> None:
    capacity_bytes = 32 << 20
    store = ReplayStore(capacity_trajectories=10**7, capacity_bytes=capacity_bytes)
    data = batch(2000, steps=100, dim=8)  # 6.5 MB
    process = psutil.Process()
    rss = []
    for i in range(60):  # ~390 MB through a 32 MB store
        assert store.insert(data).ok
        if i % 10 == 9:
            rss.append(process.memory_info().rss)
    assert store.stats()["nbytes"] <= capacity_bytes
    assert max(rss) - rss[0] < 16 << 20, [r >> 20 for r in rss]  # flat after the first fill


# -- persistence -------------------------------------------------------------------------------
def test_seal_reopen_and_continue(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=1000, segment_rows=50, run="run-1")
    for i in range(5):
        store.insert(batch(46, version=i, seed=i, source=Source.BACKWARD), worker=f"w{i}")
    assert store.flush(timeout=10)
    assert store.stats()["unsealed_rows"] == 0
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.insert(batch(1))
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert [s["rows"] for s in manifest["segments"]] == [50, 50, 50, 50, 30]
    assert manifest["next_id"] == 230

    before = store.to_table()
    reopened = ReplayStore(tmp_path, capacity_trajectories=1000, segment_rows=50, run="run-1")
    assert reopened.stats()["loaded"] == 230 and reopened.stats()["corrupt_segments"] == 0
    assert reopened.to_table().equals(before)  # every column, every row
    result = reopened.insert(batch(10, version=9))
    assert result.first_id == 230  # ids continue
    assert held_ids(reopened)[-10:] == list(range(230, 240))
    reopened.close()

    # a smaller store reloads only the newest rows, but the files keep everything
    small = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=50)
    assert held_ids(small) == list(range(140, 240))
    small.close()
    assert ds.dataset(tmp_path, format="ipc").count_rows() == 240

    with pytest.raises(ValueError, match="'states'"):
        ReplayStore(tmp_path, layout=TrajectoryLayout((STEPS + 5, DIM)))


def test_byte_flipped_segment_is_skipped_with_a_warning(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=1000, segment_rows=40)
    store.insert(batch(120))
    store.close()
    victim = tmp_path / "segment-00000001.arrow"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))

    with pytest.warns(CorruptSegmentWarning, match="segment-00000001.arrow.*checksum mismatch"):
        reopened = ReplayStore(tmp_path, capacity_trajectories=1000)
    assert reopened.stats()["corrupt_segments"] == 1
    assert held_ids(reopened) == list(range(40)) + list(range(80, 120))
    assert not victim.exists()  # set aside under a hidden name
    assert len(list(tmp_path.glob("_corrupt-*segment-00000001.arrow"))) == 1
    assert ds.dataset(tmp_path, format="ipc").count_rows() == 80
    reopened.close()


def test_corrupt_segment_beyond_capacity_is_found_by_verify(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=40)
    for i in range(4):
        store.insert(batch(40, seed=i))
    store.close()
    victim = tmp_path / "segment-00000000.arrow"  # too old to be reloaded
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    reopened = ReplayStore(tmp_path, capacity_trajectories=100)
    assert reopened.stats()["corrupt_segments"] == 0
    with pytest.warns(CorruptSegmentWarning, match="segment-00000000.arrow"):
        assert reopened.verify_segments() == 1
    assert reopened.stats()["corrupt_segments"] == 1
    reopened.close()


def test_recovery_adopts_complete_orphans_and_drops_the_rest(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=1000, segment_rows=30)
    store.insert(batch(90))
    store.close()
    # a crash between the segment rename and the manifest rename: the last one is unlisted
    manifest_path = tmp_path / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["segments"] = manifest["segments"][:2]
    manifest_path.write_text(json.dumps(manifest))
    # a crash mid-write of a segment: a hidden temporary file
    (tmp_path / ".segment-00000003.arrow.tmp").write_bytes(b"ARROW1\0\0half a segment")
    # something that never was a complete segment, under a segment name
    good = (tmp_path / "segment-00000000.arrow").read_bytes()
    (tmp_path / "segment-00000007.arrow").write_bytes(good[: len(good) // 2])

    with pytest.warns(CorruptSegmentWarning, match="segment-00000007.arrow"):
        reopened = ReplayStore(tmp_path, capacity_trajectories=1000)
    assert held_ids(reopened) == list(range(90))  # the orphan was adopted
    assert reopened.stats()["corrupt_segments"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
    manifest = json.loads(manifest_path.read_text())
    assert [s["file"] for s in manifest["segments"]] == [
        "segment-00000000.arrow", "segment-00000001.arrow", "segment-00000002.arrow"]
    assert reopened.insert(batch(5)).first_id == 90
    reopened.close()
    assert (tmp_path / "segment-00000008.arrow").exists()  # numbering moved past the orphan


@pytest.mark.parametrize("codes", [[0, 1, 99], [-3, 0, 1], [2.0, 2.0, 2.0], [260, 0, 0]])
def test_torch_batch_with_invalid_source_codes_is_rejected_whole(tmp_path: Path, codes) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    store.insert(batch(24))
    bad = batch(3)
    bad.source = torch.tensor(codes)  # 260 would wrap to a valid-looking 4 in int8
    result = store.insert(bad)
    assert result.status == InsertStatus.REJECTED and "field 'source'" in result.reason
    assert store.stats()["rejected_batches"] == 1 and store.size == 24
    store.close()  # the sealer never saw the bad rows: every acknowledged row is on disk
    assert ReplayStore(tmp_path, capacity_trajectories=100).size == 24


def test_ids_continue_after_the_stored_ones_when_the_manifest_lags(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    store.insert(batch(30))
    store.close()
    manifest_path = tmp_path / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["next_id"] = 3  # behind the ids on disk
    manifest_path.write_text(json.dumps(manifest))
    reopened = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    assert reopened.insert(batch(2)).first_id == 30
    assert len(set(held_ids(reopened))) == reopened.size == 32
    reopened.close()


@pytest.mark.parametrize("junk", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'{"format": 1}'])
def test_a_corrupt_manifest_is_set_aside_and_rebuilt(tmp_path: Path, junk: bytes) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    store.insert(batch(30))
    store.close()
    (tmp_path / "_manifest.json").write_bytes(junk)
    with pytest.warns(CorruptSegmentWarning, match=r"_manifest.json is unreadable"):
        reopened = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    assert held_ids(reopened) == list(range(30))
    assert reopened.insert(batch(1)).first_id == 30
    reopened.close()
    assert len(list(tmp_path.glob("_corrupt-*-_manifest.json"))) == 1
    assert json.loads((tmp_path / "_manifest.json").read_text())["next_id"] == 31


def test_a_full_disk_stops_inserts_in_one_line_and_leaves_only_whole_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from rtb_ray.replay import segments

    store = ReplayStore(tmp_path, capacity_trajectories=200, segment_rows=10)
    store.insert(batch(25))
    assert store.flush(timeout=30)  # 25 rows sealed: two full segments and a short one
    real_write = segments._Crc32Writer.write

    def full_disk(self, data):  # type: ignore[no-untyped-def]
        real_write(self, data[: len(data) // 2])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments._Crc32Writer, "write", full_disk)
    store.insert(batch(10))  # acknowledged in memory; sealing it fails
    with pytest.raises(RuntimeError, match=r"No space left on device") as err:
        for _ in range(50):
            store.insert(batch(10), timeout=5)
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError, match=r"(\d+) acknowledged rows are not on disk") as err:
        store.close()
    lost = int(str(err.value).split("; ")[1].split()[0])
    assert lost == store.stats()["inserted"] - 25 >= 10  # exactly the rows acknowledged since
    assert not list(tmp_path.glob(".*.tmp"))  # the partial file was removed, never renamed
    monkeypatch.undo()
    reopened = ReplayStore(tmp_path, capacity_trajectories=200, segment_rows=10)
    assert held_ids(reopened) == list(range(25))  # every sealed row, no partial segment
    assert reopened.stats()["corrupt_segments"] == 0
    assert reopened.insert(batch(1)).first_id == 25  # nothing past the sealed rows on disk
    reopened.close()


def test_sealing_failure_is_reported_to_writers(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "store", capacity_trajectories=100, segment_rows=10)
    store.insert(batch(5))
    shutil.rmtree(tmp_path / "store")  # the disk goes away under the store
    (tmp_path / "store").write_text("not a directory")
    store.insert(batch(5))  # completes a segment; sealing it fails
    with pytest.raises(ReplayDiskError, match="sealing a replay segment to .* failed"):
        for _ in range(100):
            store.insert(batch(10), timeout=5)
    with pytest.raises(ReplayDiskError):  # the learner hears of it at once, not at its timeout
        store.sample(10_000, timeout=None)
    with pytest.raises(ReplayDiskError, match=r"\d+ acknowledged rows are not on disk"):
        store.close()  # the rows it acknowledged are not silently dropped


# -- open format -------------------------------------------------------------------------------
def test_store_directory_is_queryable_with_pyarrow_dataset_and_duckdb(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=1000, segment_rows=25, run="gmm")
    for version in range(3):
        for source in (Source.EXPLORE, Source.PRIOR):
            store.insert(batch(20, version=version, source=source, seed=version * 10 + source))
    store.close()

    dataset = ds.dataset(tmp_path, format="ipc")
    assert sorted(os.path.basename(f) for f in dataset.files) == [
        f"segment-{i:08d}.arrow" for i in range(5)]
    table = dataset.to_table()
    expected = {}
    for version in range(3):
        for source in ("explore", "prior"):
            mask = (np.array(table.column("policy_version")) == version) & (
                np.array(table.column("source").to_pylist()) == source)
            expected[(version, source)] = table.column("log_reward").to_numpy()[mask].mean()

    rows = duckdb.sql("SELECT policy_version, source, avg(log_reward) AS mean_log_reward, "
                      "count(*) AS n FROM dataset GROUP BY ALL ORDER BY ALL").fetchall()
    assert [(v, s, n) for v, s, _, n in rows] == [(v, s, 20) for v in range(3)
                                                  for s in ("explore", "prior")]
    for version, source, mean, _ in rows:
        assert mean == pytest.approx(expected[(version, source)], rel=1e-6)
    runs = duckdb.sql("SELECT DISTINCT run FROM dataset").fetchall()
    assert runs == [("gmm",)]


def test_a_directory_is_open_in_one_store_at_a_time(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=100, segment_rows=10)
    with pytest.raises(RuntimeError, match="already open"):
        ReplayStore(tmp_path, capacity_trajectories=100)
    store.close()
    ReplayStore(tmp_path, capacity_trajectories=100).close()
    with pytest.raises(ValueError, match="min_size_to_sample=500 is more than the capacity"):
        ReplayStore(capacity_trajectories=100, min_size_to_sample=500,
                    layout=TrajectoryLayout((STEPS + 1, DIM)))


@pytest.mark.parametrize("keep", [{"keep_segments": 3}, {"keep_bytes": 1}, {}])
def test_retention_keeps_the_newest_segments_on_disk(tmp_path: Path, keep: dict) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=200, segment_rows=10, **keep)
    for seed in range(6):
        store.insert(batch(10, seed=seed))
    assert store.flush(timeout=30)
    kept = {"keep_segments": 3, "keep_bytes": 1}.get(next(iter(keep), ""), 6)  # 1 B: the newest
    stats = store.stats()
    assert stats["sealed_segments"] == 6 and stats["deleted_segments"] == 6 - kept
    files = sorted(p.name for p in tmp_path.glob("segment-*.arrow"))
    assert files == [f"segment-{i:08d}.arrow" for i in range(6 - kept, 6)]  # oldest went first
    assert stats["disk_bytes"] == sum((tmp_path / f).stat().st_size for f in files)
    # memory is not disk: the store still holds and samples every row
    assert held_ids(store) == list(range(60))
    assert ds.dataset(tmp_path, format="ipc").to_table().num_rows == 10 * kept
    store.close()
    reopened = ReplayStore(tmp_path, capacity_trajectories=200, segment_rows=10, **keep)
    assert held_ids(reopened) == list(range(60 - 10 * kept, 60))  # what was kept reloads
    assert reopened.insert(batch(1)).first_id == 60  # ids still continue after the largest
    assert reopened.stats()["corrupt_segments"] == 0
    reopened.close()


def test_a_segment_unlisted_but_not_yet_deleted_is_readopted_in_id_order(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=200, segment_rows=10, keep_segments=2)
    for seed in range(3):
        store.insert(batch(10, seed=seed))
    store.flush(timeout=30)
    store.close()
    # a crash after the manifest dropped segment 0 and before its file was deleted
    kept = sorted(tmp_path.glob("segment-*.arrow"))
    ids = pa.ipc.open_file(str(kept[0])).read_all().column("id").to_pylist()
    table = pa.ipc.open_file(str(kept[0])).read_all()
    table = table.set_column(table.schema.get_field_index("id"), table.schema.field("id"),
                             pa.array([i - 10 for i in ids], pa.int64()))
    with pa.ipc.new_file(str(tmp_path / "segment-00000000.arrow"), table.schema) as w:
        w.write_table(table)
    reopened = ReplayStore(tmp_path, capacity_trajectories=200, segment_rows=10, keep_segments=2)
    assert held_ids(reopened) == list(range(30))  # adopted, and loaded oldest first
    reopened.insert(batch(10, seed=9))
    reopened.flush(timeout=30)  # the next seal applies retention to it again
    assert sorted(p.name for p in tmp_path.glob("segment-*.arrow")) == [
        "segment-00000002.arrow", "segment-00000003.arrow"]
    reopened.close()


def test_rows_are_sealed_by_age_so_a_crash_loses_seconds_not_a_segment(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=1000, segment_rows=400, seal_every_s=0.3)
    store.insert(batch(7))  # far from a full segment, no flush
    deadline = time.monotonic() + 10
    while store.stats()["sealed_rows"] < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stats()["sealed_rows"] == 7 and store.stats()["sealed_segments"] == 1
    time.sleep(0.5)  # nothing pending: no empty segments, no busy sealer
    assert store.stats()["sealed_segments"] == 1
    store.close()
    with pytest.raises(ValueError, match="seal_every_s"):
        ReplayStore(tmp_path / "x", seal_every_s=0)
