"""The trajectory schema in Arrow: exact round trips, zero copies where claimed, clear errors."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch

from rtb_ray.trajectory import (
    Source,
    TrajectoryBatch,
    TrajectoryLayout,
    from_arrow,
    to_arrow,
    trajectory_schema,
    validate_record_batch,
)

# from_arrow hands out tensors over read-only Arrow memory; torch says so once per process
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")


def make_batch(b: int = 6, steps: int = 5, event: tuple[int, ...] = (2,),
               cond: torch.Tensor | None = None, tokens: bool = False) -> TrajectoryBatch:
    gen = torch.Generator().manual_seed(0)
    if tokens:
        states = torch.randint(0, 50, (b, steps + 1, *event), generator=gen)
    else:
        states = torch.randn(b, steps + 1, *event, generator=gen)
    log_reward, log_prior, log_behaviour = torch.randn(3, b, generator=gen)
    batch = TrajectoryBatch.make(states, log_reward, log_prior, log_behaviour, Source.EXPLORE, 7,
                                 cond)
    batch.source[::2] = int(Source.BACKWARD)
    return batch


def assert_same(a: TrajectoryBatch, b: TrajectoryBatch) -> None:
    for name in ("states", "log_reward", "log_prior", "log_behaviour", "source", "policy_version"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.cond is None) == (b.cond is None)
    if a.cond is not None:
        assert a.cond.dtype == b.cond.dtype and torch.equal(a.cond, b.cond)


@pytest.mark.parametrize("kind", ["float", "tokens", "tensor_cond", "label_cond"])
def test_round_trip_is_exact(kind: str) -> None:
    cond = {"tensor_cond": torch.randn(6, 3), "label_cond": torch.arange(6)}.get(kind)
    batch = make_batch(tokens=kind == "tokens", event=(4,) if kind == "tokens" else (2,), cond=cond)
    stamp = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    rb = to_arrow(batch, run="run-a", worker="w3", first_id=100, created_at=stamp)

    assert rb.schema.equals(TrajectoryLayout.of(batch.states.numpy(),
                                                None if cond is None else cond.numpy()).schema())
    assert rb.column("id").to_pylist() == list(range(100, 106))
    assert set(rb.column("run").to_pylist()) == {"run-a"}
    assert set(rb.column("worker").to_pylist()) == {"w3"}
    assert rb.column("source").to_pylist()[:2] == ["backward", "explore"]
    assert rb.column("created_at")[0].as_py() == stamp
    back = from_arrow(rb)
    assert_same(batch, back)
    assert back.extras["id"].tolist() == list(range(100, 106))
    assert_same(batch, from_arrow(pa.Table.from_batches([rb])))  # tables too


def test_conversion_is_zero_copy_both_ways() -> None:
    batch = make_batch(b=64, steps=100)
    rb = to_arrow(batch)
    states_buffer = rb.column("states").storage.values.buffers()[1]
    assert states_buffer.address == batch.states.data_ptr()  # torch -> Arrow: no copy
    assert rb.column("log_reward").buffers()[1].address == batch.log_reward.data_ptr()

    back = from_arrow(rb)
    assert back.states.data_ptr() == states_buffer.address  # Arrow -> torch: no copy
    assert back.log_prior.data_ptr() == rb.column("log_prior").buffers()[1].address
    assert back.source.data_ptr() == rb.column("source").indices.buffers()[1].address

    # a slice of a record batch is still a view
    part = from_arrow(rb.slice(10, 5))
    assert part.states.data_ptr() == batch.states[10].data_ptr()
    assert torch.equal(part.states, batch.states[10:15])


def test_non_contiguous_and_cast_columns_are_converted() -> None:
    batch = make_batch(b=8)
    strided = batch.index(slice(None, None, 2))  # non-contiguous views
    strided.log_reward = strided.log_reward.double()
    back = from_arrow(to_arrow(strided))
    assert torch.equal(back.states, strided.states)
    assert back.log_reward.dtype == torch.float32
    assert torch.equal(back.log_reward, strided.log_reward.float())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_image_states_are_stored_as_float32(half: torch.dtype) -> None:
    """A sampler in fp16/bf16 (a UNet) inserts image-shaped states: stored as float32, the
    layout every float task has, whatever precision made them."""
    batch = make_batch(b=4, steps=3, event=(3, 4, 4), cond=torch.arange(4)[:, None])
    batch.states = batch.states.to(half)
    rb = to_arrow(batch)
    layout = TrajectoryLayout.from_schema(rb.schema)
    assert layout.state_dtype == "float32" and layout.state_shape == (4, 3, 4, 4)
    back = from_arrow(rb)
    assert back.states.dtype == torch.float32
    assert torch.equal(back.states, batch.states.float())


def test_schema_builder_fields() -> None:
    schema = trajectory_schema((101, 2))
    assert schema.names == ["id", "run", "policy_version", "source", "worker", "states",
                            "log_reward", "log_prior", "log_behaviour", "created_at"]
    assert schema.field("states").type == pa.fixed_shape_tensor(pa.float32(), [101, 2])
    assert "cond" in trajectory_schema((11, 2), cond_shape=(3,), cond_dtype="float32").names
    with pytest.raises(ValueError, match="'states'"):
        trajectory_schema((101, 2), "complex64")
    with pytest.raises(ValueError, match="'cond'"):
        trajectory_schema((101, 2), cond_shape=(3,))


def replace_column(rb: pa.RecordBatch, name: str, column: pa.Array) -> pa.RecordBatch:
    return rb.set_column(rb.schema.get_field_index(name), name, column)


def test_validation_errors_name_the_field() -> None:
    rb = to_arrow(make_batch())
    layout = TrajectoryLayout.from_schema(rb.schema)
    validate_record_batch(rb, layout)  # the good batch passes

    cases = {
        "missing field 'log_prior'": rb.drop_columns(["log_prior"]),
        "unexpected field 'extra'": rb.append_column("extra", pa.array(np.zeros(6))),
        "field 'log_reward': expected type float": replace_column(
            rb, "log_reward", pa.array(np.zeros(6, np.float64))),
        "field 'log_behaviour': 1 null": replace_column(
            rb, "log_behaviour", pa.array([0.0, None, 1.0, 1.0, 1.0, 1.0], pa.float32())),
        "field 'source': unknown source 'teleport'": replace_column(
            rb, "source", pa.DictionaryArray.from_arrays(pa.array(np.zeros(6, np.int8)),
                                                         pa.array(["teleport"]))),
        "field 'worker': dictionary index out of range": replace_column(
            rb, "worker", pa.DictionaryArray.from_arrays(pa.array(np.full(6, 3, np.int32)),
                                                         pa.array(["w"]), safe=False)),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            validate_record_batch(bad, layout)

    other_shape = to_arrow(make_batch(steps=7))
    with pytest.raises(ValueError, match=r"field 'states': expected float32 \[6, 2\] per row, "
                                         r"got float32 \[8, 2\]"):
        validate_record_batch(other_shape, layout)
    tokens = to_arrow(make_batch(tokens=True))
    with pytest.raises(ValueError, match="field 'states': expected float32.*got int64"):
        validate_record_batch(tokens, layout)
    flat = replace_column(rb, "states", pa.array(np.zeros(6, np.float32)))
    with pytest.raises(ValueError, match="field 'states': expected a fixed_shape_tensor"):
        validate_record_batch(flat, layout)
    with pytest.raises(ValueError, match="missing field 'cond'"):
        validate_record_batch(rb, TrajectoryLayout((6, 2), "float32", (3,), "float32"))


def test_source_dictionary_in_another_order_is_decoded() -> None:
    batch = make_batch()
    rb = to_arrow(batch)
    names = ["backward", "explore"]  # a writer's own dictionary
    codes = np.array([names.index(s) for s in rb.column("source").to_pylist()], np.int8)
    rb = replace_column(rb, "source", pa.DictionaryArray.from_arrays(pa.array(codes),
                                                                     pa.array(names)))
    assert torch.equal(from_arrow(rb).source, batch.source)
