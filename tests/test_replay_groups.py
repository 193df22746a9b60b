"""The replay store with group_size k > 1: groups of k rows sharing one cond stay whole from
insert to sample (alignment, validation, quarantine, eviction, reopening)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rtb_ray.replay import InsertStatus, Mixture, Prioritised, Recency, ReplayStore, Uniform
from rtb_ray.replay.ring import ColumnRing
from rtb_ray.trajectory import Source, TrajectoryBatch, TrajectoryLayout, to_arrow
from test_replay_store import DIM, STEPS, batch, held_ids, unchanged

K = 4
LAYOUT = TrajectoryLayout((STEPS + 1, DIM), "float32", (2,), "float32")


def grouped(groups: int, *, first_group: int = 0, source: Source = Source.PRIOR,
            seed: int = 0) -> TrajectoryBatch:
    """``groups`` groups of K rows; group g's cond is (first_group + g, −that), repeated K
    times, so a sampled row's cond names the group it was inserted in."""
    cond = torch.arange(first_group, first_group + groups, dtype=torch.float32)
    cond = torch.stack([cond, -cond], 1).repeat_interleave(K, 0)
    return replace(batch(groups * K, source=source, seed=seed), cond=cond)


def assert_whole_groups(sample: TrajectoryBatch, held: list[int] | None = None) -> None:
    """Each K-block of the sample is one group: consecutive ids, one cond, one source, and
    (when given) all of them held by the store."""
    assert len(sample) % K == 0
    ids = sample.extras["id"].numpy().reshape(-1, K)
    assert (ids - ids[:, :1] == np.arange(K)).all()
    cond = sample.cond.numpy().reshape(-1, K, 2)
    assert (cond == cond[:, :1]).all()
    source = sample.source.numpy().reshape(-1, K)
    assert (source == source[:, :1]).all()
    if held is not None:
        assert set(ids.ravel().tolist()) <= set(held)


def test_arguments_are_checked_and_sizes_rounded_to_whole_groups() -> None:
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        ReplayStore(group_size=0)
    with pytest.raises(ValueError, match="group_size=4"):
        ReplayStore(capacity_trajectories=3, group_size=K)
    row_nbytes = ColumnRing.row_nbytes(LAYOUT)
    with pytest.raises(ValueError, match="group_size=4"):
        ReplayStore(capacity_bytes=3 * row_nbytes, layout=LAYOUT, group_size=K)
    store = ReplayStore(capacity_bytes=7 * row_nbytes, layout=LAYOUT, group_size=K)
    assert store.capacity == 4 and store.stats()["group_size"] == K
    assert ReplayStore(capacity_trajectories=11, layout=LAYOUT, group_size=K).capacity == 8
    assert ReplayStore(capacity_trajectories=11, layout=LAYOUT).stats()["group_size"] == 1


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_samples_are_whole_groups_with_every_sampler(tmp_path: Path, on_disk: bool) -> None:
    # capacity 50 -> 48; 10 inserts of 3 groups (alternating sources) evict the oldest 72 rows
    store = ReplayStore(tmp_path if on_disk else None, capacity_trajectories=50,
                        segment_rows=9 if on_disk else None, layout=LAYOUT, group_size=K,
                        seed=1)
    assert store.capacity == 48
    for i in range(10):
        source = Source.PRIOR if i % 2 else Source.POSTERIOR
        result = store.insert(grouped(3, first_group=3 * i, source=source, seed=i), timeout=10)
        assert result.ok and result.first_id == 12 * i
    held = held_ids(store)
    assert held == list(range(72, 120))
    mixture = Mixture({"prior": .5, "posterior": .5})
    for sampler in (Uniform(), Recency(half_life=3), Prioritised(0.1), mixture,
                    Mixture({"prior": .5, "posterior": .5}, inner=Recency(half_life=2))):
        for _ in range(5):
            sample = store.sample(40, sampler=sampler, timeout=5)
            assert len(sample) == 40
            assert_whole_groups(sample, held)
            # each row is the one inserted: ids were assigned from 0, group g has ids gK..gK+K-1
            ids = sample.extras["id"].numpy()
            assert (sample.cond[:, 0].numpy() == ids // K).all()
    # the mixture splits the 10 groups by quota: 5 of each source
    sources = store.sample(40, sampler=mixture).source.tolist()
    assert sources.count(int(Source.PRIOR)) == sources.count(int(Source.POSTERIOR)) == 20
    # groups come in random order (leaders are not sorted in every draw)
    leaders = [store.sample(40).extras["id"][::K].tolist() for _ in range(5)]
    assert any(ls != sorted(ls) for ls in leaders)
    store.close()


def test_samplers_rank_and_age_groups() -> None:
    store = ReplayStore(capacity_trajectories=48, group_size=K, seed=2)
    data = grouped(12)
    data.log_reward[::K] = torch.arange(12, dtype=torch.float32)  # leader rewards: group 11 best
    data.log_reward[5] = 100.0  # a non-leader's reward does not rank its group
    assert store.insert(data).ok
    best = store.sample(400, sampler=Prioritised(1e-3)).extras["id"][::K]
    assert (best == 11 * K).float().mean() > 0.8
    newest = store.sample(400, sampler=Recency(half_life=0.5)).extras["id"][::K]
    assert (newest == 11 * K).float().mean() > 0.6


def test_batches_that_are_not_whole_groups_are_rejected_whole() -> None:
    store = ReplayStore(capacity_trajectories=40, group_size=K)
    assert store.insert(grouped(2)).ok
    ids, before = held_ids(store), store.stats()
    mixed_cond = grouped(3)
    mixed_cond.cond[K + 2, 1] = 7.0  # group 1's third row
    mixed_source = grouped(3)
    mixed_source.source[2 * K + 1] = int(Source.POSTERIOR)  # group 2's second row
    bad = [
        (grouped(3).index(slice(0, 10)), "10 rows is not a multiple of group_size=4"),
        (to_arrow(grouped(3)).slice(0, 6), "6 rows is not a multiple of group_size=4"),
        (mixed_cond, "field 'cond' differs within group 1"),
        (to_arrow(mixed_cond), "field 'cond' differs within group 1"),
        (mixed_source, "field 'source' differs within group 2"),
        (grouped(11), "more than the 40"),
    ]
    for i, (data, message) in enumerate(bad):
        result = store.insert(data)
        assert result.status == InsertStatus.REJECTED, message
        assert message in result.reason and "\n" not in result.reason
        unchanged(store, before)
        assert store.stats()["rejected_batches"] == i + 1
    assert held_ids(store) == ids and store.size == 2 * K
    assert store.insert(to_arrow(grouped(1, first_group=2))).ok  # whole groups as Arrow too
    assert held_ids(store) == list(range(3 * K))


def test_a_non_finite_row_quarantines_its_whole_group() -> None:
    store = ReplayStore(capacity_trajectories=40, group_size=K)
    data = grouped(3)
    data.log_reward[K + 1] = float("nan")  # one row of group 1
    result = store.insert(data)
    assert (result.status, result.inserted, result.quarantined) == (InsertStatus.INSERTED, 8, K)
    assert result.first_id == 0 and store.stats()["quarantined_rows"] == K
    assert held_ids(store) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert store.quarantined().column("id").to_pylist() == [4, 5, 6, 7]
    # the next batch's ids follow the whole batch, quarantined rows included
    assert store.insert(grouped(1, first_group=3)).first_id == 12
    for _ in range(5):
        assert_whole_groups(store.sample(12), held_ids(store))


def test_eviction_keeps_groups_aligned() -> None:
    store = ReplayStore(capacity_trajectories=10, group_size=K)  # rounded down to 8
    for g in range(5):
        assert store.insert(grouped(1, first_group=g)).ok
    assert store.capacity == 8 and store.size == 8
    assert held_ids(store) == list(range(12, 20)) and store.stats()["evicted"] == 12
    for _ in range(5):
        sample = store.sample(8)
        assert_whole_groups(sample, held_ids(store))
        assert (sample.cond[:, 0].numpy() == sample.extras["id"].numpy() // K).all()


def test_sample_size_must_be_a_multiple_of_group_size() -> None:
    store = ReplayStore(capacity_trajectories=40, group_size=K)
    store.insert(grouped(2))
    with pytest.raises(ValueError, match="group_size=4"):
        store.sample(6)
    assert len(store.sample(K)) == K


def test_reopening_a_directory_keeps_whole_groups(tmp_path: Path) -> None:
    # segment_rows 9 -> 8: full segments and the flushed partial one hold whole groups
    store = ReplayStore(tmp_path, capacity_trajectories=40, segment_rows=9, group_size=K)
    for i in range(3):
        assert store.insert(grouped(3, first_group=3 * i, seed=i), timeout=10).ok
    assert store.flush(timeout=10)
    store.close()
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert [s["rows"] for s in manifest["segments"]] == [8, 8, 8, 8, 4]
    # a smaller capacity (22 -> 20) reloads the newest 20 rows: groups 4..8
    store = ReplayStore(tmp_path, capacity_trajectories=22, segment_rows=8, group_size=K)
    assert held_ids(store) == list(range(16, 36)) and store.stats()["loaded"] == 20
    for _ in range(5):
        sample = store.sample(12, timeout=5)
        assert_whole_groups(sample, held_ids(store))
        assert (sample.cond[:, 0].numpy() == sample.extras["id"].numpy() // K).all()
    assert store.insert(grouped(1, first_group=9)).first_id == 36
    store.close()


def test_reopening_rows_of_another_group_size_keeps_a_multiple_of_group_size(
        tmp_path: Path) -> None:
    store = ReplayStore(tmp_path, capacity_trajectories=40, segment_rows=5, layout=LAYOUT)
    assert store.insert(replace(batch(10), cond=torch.zeros(10, 2))).ok
    store.close()
    store = ReplayStore(tmp_path, capacity_trajectories=40, group_size=K)
    assert held_ids(store) == list(range(2, 10))  # the oldest 2 rows dropped
    assert_whole_groups(store.sample(8))
    store.close()
