"""The one trajectory batch that samplers produce, the replay store keeps and the learner eats.

A row is one trajectory ``x_0 -> ... -> x_T``. Everything the RTB loss needs except the
posterior's own log-probabilities is computed once, when the trajectory is made, and travels
with it: the prior is frozen and the reward is a black box, so neither is ever re-evaluated.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import IntEnum
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor


class Source(IntEnum):
    """Which process made a trajectory. Stored as a small int; names are the public form."""

    POSTERIOR = 0  # the posterior itself, no exploration
    EXPLORE = 1  # the posterior with inflated variance
    PRIOR = 2  # the frozen prior
    BACKWARD = 3  # a known x_T noised back to x_0 by the fixed noising process
    # no sampler makes LOCAL_SEARCH yet; it stays because every stored source dictionary lists it
    LOCAL_SEARCH = 4  # x_T improved by local search, then noised back
    DATASET = 5  # a known terminal state of the task's data, noised back (codes only grow)

    @classmethod
    def parse(cls, name: str) -> "Source":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"unknown source {name!r}; expected one of {[s.name.lower() for s in cls]}"
            ) from None


@dataclass
class TrajectoryBatch:
    """B trajectories. ``states`` is ``[B, T+1, *event]`` (float32, or int64 tokens)."""

    states: Tensor
    log_reward: Tensor  # [B]  log r(x_T), *without* the temperature beta
    log_prior: Tensor  # [B]  sum_t log p_prior(x_{t+1} | x_t)
    log_behaviour: Tensor  # [B]  sum_t log q(x_{t+1} | x_t) under the process that sampled it
    source: Tensor  # [B]  int8 codes of Source
    policy_version: Tensor  # [B]  int64, weights version that sampled it (-1: not a policy)
    cond: Tensor | None = None  # [B, *cond] conditioning (class label, prompt, RL state)
    extras: dict[str, Tensor] = field(default_factory=dict)  # not persisted

    def __post_init__(self) -> None:
        b = self.states.shape[0]
        for f in _COLUMNS[1:]:
            v = getattr(self, f)
            if v.shape != (b,):
                raise ValueError(f"TrajectoryBatch.{f} has shape {tuple(v.shape)}, expected ({b},)")
        if self.cond is not None and self.cond.shape[0] != b:
            raise ValueError(f"TrajectoryBatch.cond has {self.cond.shape[0]} rows, expected {b}")

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1

    @property
    def terminal(self) -> Tensor:
        return self.states[:, -1]

    @classmethod
    def make(cls, states: Tensor, log_reward: Tensor, log_prior: Tensor, log_behaviour: Tensor,
             source: Source, policy_version: int = -1, cond: Tensor | None = None
             ) -> "TrajectoryBatch":
        """A batch from one source and one weights version (what every sampler produces)."""
        b, dev = states.shape[0], states.device
        return cls(states, log_reward.float(), log_prior.float(), log_behaviour.float(),
                   source=torch.full((b,), int(source), dtype=torch.int8, device=dev),
                   policy_version=torch.full((b,), policy_version, dtype=torch.int64, device=dev),
                   cond=cond)

    def _map(self, fn) -> "TrajectoryBatch":
        """Apply ``fn`` to every tensor column (cond included); extras are dropped."""
        return replace(
            self,
            **{name: fn(getattr(self, name)) for name in _COLUMNS},
            cond=None if self.cond is None else fn(self.cond),
            extras={},
        )

    def index(self, idx: Tensor | slice) -> "TrajectoryBatch":
        return self._map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> "TrajectoryBatch":
        return self._map(lambda t: t.to(device))

    @classmethod
    def cat(cls, batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        if len(batches) == 1:
            return batches[0]
        conds = [b.cond for b in batches]
        if any(c is None for c in conds) and not all(c is None for c in conds):
            raise ValueError("cannot concatenate conditioned and unconditioned trajectories")
        return cls(
            **{name: torch.cat([getattr(b, name) for b in batches]) for name in _COLUMNS},
            cond=None if conds[0] is None else torch.cat(conds),  # type: ignore[arg-type]
        )


_COLUMNS = ("states", "log_reward", "log_prior", "log_behaviour", "source", "policy_version")


# -- the Arrow form ------------------------------------------------------------------------------
# One row per trajectory: what the replay store keeps, writes to disk and what users query with
# pyarrow or DuckDB. torch -> Arrow and back goes through ``TrajectoryColumns`` (numpy arrays), and
# every step is a view where the layout allows: C-contiguous CPU tensors, fixed-shape tensor
# columns, no nulls. Anything that must be computed (casts, dictionary remaps) is one row wide.

SOURCE_NAMES: tuple[str, ...] = tuple(s.name.lower() for s in Source)  # index = Source code
SCHEMA_VERSION = "1"
_SOURCE_DICTIONARY = pa.array(SOURCE_NAMES, pa.string())
_NAME_TYPE = pa.dictionary(pa.int32(), pa.string())  # run and worker names
_SCALAR_TYPES: dict[str, pa.DataType] = {
    "id": pa.int64(),
    "run": _NAME_TYPE,
    "policy_version": pa.int64(),
    "source": pa.dictionary(pa.int8(), pa.string()),
    "worker": _NAME_TYPE,
    "log_reward": pa.float32(),
    "log_prior": pa.float32(),
    "log_behaviour": pa.float32(),
    "created_at": pa.timestamp("us", tz="UTC"),
}
# column order of the schema (``cond`` only when the task is conditional)
FIELD_NAMES = ("id", "run", "policy_version", "source", "worker", "states", "cond",
               "log_reward", "log_prior", "log_behaviour", "created_at")


def _numpy_dtype(dtype: object, field: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "fiu":
        raise ValueError(f"field {field!r}: dtype {dt} is not a float or integer type")
    return dt


def _tensor_type(dtype: np.dtype, shape: tuple[int, ...]) -> pa.DataType:
    """A fixed-shape tensor column (row-major), or a plain column for one value per row."""
    value = pa.from_numpy_dtype(dtype)
    return pa.fixed_shape_tensor(value, list(shape)) if shape else value


@dataclass(frozen=True)
class TrajectoryLayout:
    """What differs between tasks: shape ``[T+1, *event]`` and dtype of the states, and of cond."""

    state_shape: tuple[int, ...]
    state_dtype: str = "float32"
    cond_shape: tuple[int, ...] | None = None
    cond_dtype: str | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.state_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"field 'states': shape {shape} must be [T+1, *event] with sizes >= 1")
        object.__setattr__(self, "state_shape", shape)
        object.__setattr__(self, "state_dtype", _numpy_dtype(self.state_dtype, "states").name)
        if (self.cond_shape is None) != (self.cond_dtype is None):
            raise ValueError("field 'cond': give both its shape and its dtype, or neither")
        if self.cond_shape is not None:
            object.__setattr__(self, "cond_shape", tuple(int(s) for s in self.cond_shape))
            object.__setattr__(self, "cond_dtype", _numpy_dtype(self.cond_dtype, "cond").name)

    @classmethod
    def of(cls, states: np.ndarray, cond: np.ndarray | None = None) -> "TrajectoryLayout":
        """The layout of a batch of arrays ``states [B, T+1, *event]``, ``cond [B, *cond]``."""
        if states.ndim < 2:
            raise ValueError(f"field 'states': shape {states.shape} is not [B, T+1, *event]")
        return cls(states.shape[1:], states.dtype,
                   None if cond is None else cond.shape[1:], None if cond is None else cond.dtype)

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> "TrajectoryLayout":
        def tensor(name: str) -> tuple[tuple[int, ...], np.dtype]:
            t = schema.field(name).type
            if isinstance(t, pa.FixedShapeTensorType):
                if t.permutation is not None and list(t.permutation) != sorted(t.permutation):
                    raise ValueError(f"field {name!r}: only row-major tensors are supported")
                return tuple(t.shape), np.dtype(t.value_type.to_pandas_dtype())
            if name == "cond" and (pa.types.is_integer(t) or pa.types.is_floating(t)):
                return (), np.dtype(t.to_pandas_dtype())
            raise ValueError(f"field {name!r}: expected a fixed_shape_tensor column, got {t}")

        if "states" not in schema.names:
            raise ValueError("missing field 'states'")
        state_shape, state_dtype = tensor("states")
        cond_shape, cond_dtype = tensor("cond") if "cond" in schema.names else (None, None)
        return cls(state_shape, state_dtype, cond_shape, cond_dtype)

    def schema(self) -> pa.Schema:
        tensors = {"states": _tensor_type(np.dtype(self.state_dtype), self.state_shape)}
        if self.cond_shape is not None:
            tensors["cond"] = _tensor_type(np.dtype(self.cond_dtype), self.cond_shape)
        types = {**_SCALAR_TYPES, **tensors}
        fields = [pa.field(name, types[name], nullable=False)
                  for name in FIELD_NAMES if name in types]
        return pa.schema(fields, metadata={"rtb_ray.trajectory_schema": SCHEMA_VERSION})

    def check(self, other: "TrajectoryLayout") -> None:
        """Raise a ValueError naming the field where ``other`` (incoming data) differs."""
        if (other.state_shape, other.state_dtype) != (self.state_shape, self.state_dtype):
            raise ValueError(f"field 'states': expected {self.state_dtype} {list(self.state_shape)}"
                             f" per row, got {other.state_dtype} {list(other.state_shape)}")
        if (other.cond_shape, other.cond_dtype) != (self.cond_shape, self.cond_dtype):
            if self.cond_shape is None:
                raise ValueError("field 'cond': this store holds unconditional trajectories")
            if other.cond_shape is None:
                raise ValueError("missing field 'cond'")
            raise ValueError(f"field 'cond': expected {self.cond_dtype} {list(self.cond_shape)}"
                             f" per row, got {other.cond_dtype} {list(other.cond_shape)}")

    def to_json(self) -> dict:
        return asdict(self)  # tuples become JSON lists; __post_init__ turns them back

    @classmethod
    def from_json(cls, d: dict) -> "TrajectoryLayout":
        return cls(**d)


def trajectory_schema(state_shape: tuple[int, ...], state_dtype: str = "float32",
                      cond_shape: tuple[int, ...] | None = None, cond_dtype: str | None = None
                      ) -> pa.Schema:
    """The Arrow schema of trajectories whose states are ``state_shape`` (= [T+1, *event])."""
    return TrajectoryLayout(state_shape, state_dtype, cond_shape, cond_dtype).schema()


@dataclass
class TrajectoryColumns:
    """The Arrow row layout as numpy arrays: what crosses between torch, Arrow and the store.

    ``run`` and ``worker`` are int32 codes into ``run_names`` / ``worker_names``; ``source`` is
    the int8 ``Source`` code; ``created_at`` is microseconds since the epoch (UTC)."""

    id: np.ndarray
    run: np.ndarray
    policy_version: np.ndarray
    source: np.ndarray
    worker: np.ndarray
    states: np.ndarray
    cond: np.ndarray | None
    log_reward: np.ndarray
    log_prior: np.ndarray
    log_behaviour: np.ndarray
    created_at: np.ndarray
    run_names: list[str]
    worker_names: list[str]

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def layout(self) -> TrajectoryLayout:
        return TrajectoryLayout.of(self.states, self.cond)

    def take(self, rows: np.ndarray) -> "TrajectoryColumns":
        """The given rows (an index or boolean mask), copied."""
        arrays = {name: getattr(self, name) for name in FIELD_NAMES}
        return replace(self, **{name: a[rows] for name, a in arrays.items() if a is not None})

    def to_arrow(self) -> pa.RecordBatch:
        """A record batch of :func:`trajectory_schema`, zero-copy for contiguous columns."""
        def names(codes: np.ndarray, values: list[str]) -> pa.Array:
            return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(values, pa.string()))

        def tensor(a: np.ndarray) -> pa.Array:
            a = np.ascontiguousarray(a)
            if a.ndim == 1:
                return pa.array(a)
            storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)),
                                                        math.prod(a.shape[1:]))
            return pa.ExtensionArray.from_storage(_tensor_type(a.dtype, a.shape[1:]), storage)

        schema = self.layout.schema()
        columns = {
            "id": pa.array(self.id),
            "run": names(self.run, self.run_names),
            "policy_version": pa.array(self.policy_version),
            "source": pa.DictionaryArray.from_arrays(pa.array(self.source), _SOURCE_DICTIONARY),
            "worker": names(self.worker, self.worker_names),
            "states": tensor(self.states),
            "cond": None if self.cond is None else tensor(self.cond),
            "log_reward": pa.array(self.log_reward),
            "log_prior": pa.array(self.log_prior),
            "log_behaviour": pa.array(self.log_behaviour),
            "created_at": pa.array(self.created_at).view(_SCALAR_TYPES["created_at"]),
        }
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)

    def to_batch(self) -> TrajectoryBatch:
        """The torch batch (sharing memory with these arrays); ids go to ``extras["id"]``. Arrays
        over Arrow memory are read-only: torch warns once, and the tensors must not be written."""
        t = torch.from_numpy
        return TrajectoryBatch(
            states=t(self.states), log_reward=t(self.log_reward), log_prior=t(self.log_prior),
            log_behaviour=t(self.log_behaviour), source=t(self.source),
            policy_version=t(self.policy_version),
            cond=None if self.cond is None else t(self.cond), extras={"id": t(self.id)},
        )


_INT64, _INT8, _FLOAT32 = np.dtype(np.int64), np.dtype(np.int8), np.dtype(np.float32)


def columns_from_batch(batch: TrajectoryBatch, *, run: str = "", worker: str = "",
                       first_id: int = 0, created_at: datetime | None = None) -> TrajectoryColumns:
    """Numpy views of a (CPU, contiguous) torch batch; ids are ``first_id, first_id + 1, ...``."""
    def array(t: Tensor, dtype: np.dtype | None = None) -> np.ndarray:
        # the common case (a CPU tensor of the right dtype) is a plain view, with as few calls as
        # possible: this is the replay store's insert path, where every call shows (right after
        # a random gather over a large ring, each costs several times its cold-cache price)
        if t.dtype in (torch.float16, torch.bfloat16):
            # half-precision samplers (a UNet in fp16/bf16) store float32, the one float layout;
            # numpy has no bfloat16 at all
            t = t.float()
        try:
            a = t.numpy()
        except (RuntimeError, TypeError):  # needs grad, or not on the CPU
            a = t.detach().cpu().numpy()
        if dtype is not None and a.dtype != dtype:
            a = a.astype(dtype)
        return np.ascontiguousarray(a)

    b = len(batch)
    stamp = time.time_ns() // 1000 if created_at is None else int(created_at.timestamp() * 1e6)
    # checked before the cast to int8, which would wrap 260 to a valid-looking 4
    source = array(batch.source)
    bad = (source < 0) | (source >= len(SOURCE_NAMES))
    if source.dtype.kind not in "iu" or bad.any():
        what = source.dtype if source.dtype.kind not in "iu" else f"code {source[bad][0]}"
        raise ValueError(f"field 'source': {what} is not a Source code "
                         f"(0..{len(SOURCE_NAMES) - 1}: {', '.join(SOURCE_NAMES)})")
    return TrajectoryColumns(
        id=np.arange(first_id, first_id + b, dtype=np.int64),
        run=np.zeros(b, np.int32),
        policy_version=array(batch.policy_version, _INT64),
        source=source.astype(_INT8, copy=False),
        worker=np.zeros(b, np.int32),
        states=array(batch.states),
        cond=None if batch.cond is None else array(batch.cond),
        log_reward=array(batch.log_reward, _FLOAT32),
        log_prior=array(batch.log_prior, _FLOAT32),
        log_behaviour=array(batch.log_behaviour, _FLOAT32),
        created_at=np.full(b, stamp, np.int64),
        run_names=[run],
        worker_names=[worker],
    )


def validate_record_batch(
    data: pa.RecordBatch, layout: TrajectoryLayout | pa.Schema | None = None
) -> None:
    """Check a record batch against the trajectory schema (field names, types, shapes, no nulls)
    and, when given, a store's ``layout`` (or schema). Raises a ValueError naming the field."""
    if isinstance(layout, pa.Schema):
        layout = TrajectoryLayout.from_schema(layout)
    names = data.schema.names
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate field names in {names}")
    expected = (layout or TrajectoryLayout.from_schema(data.schema)).schema()
    if missing := [name for name in expected.names if name not in names]:
        raise ValueError(f"missing field {missing[0]!r}")
    if unexpected := [name for name in names if name not in expected.names]:
        raise ValueError(f"unexpected field {unexpected[0]!r}")
    for spec in expected:
        column = data.column(spec.name)
        if column.type != spec.type:
            if spec.name in ("states", "cond") and layout is not None:
                layout.check(TrajectoryLayout.from_schema(data.schema))  # names shape and dtype
            raise ValueError(f"field {spec.name!r}: expected type {spec.type}, got {column.type}")
        if column.null_count:
            raise ValueError(f"field {spec.name!r}: {column.null_count} null values")
    for name in ("run", "source", "worker"):
        column = data.column(name)
        indices = column.indices.to_numpy(zero_copy_only=False)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(column.dictionary)):
            raise ValueError(f"field {name!r}: dictionary index out of range")
    unknown = set(data.column("source").dictionary.to_pylist()) - set(SOURCE_NAMES)
    if unknown:
        raise ValueError(f"field 'source': unknown source {sorted(unknown)[0]!r}; "
                         f"expected one of {list(SOURCE_NAMES)}")


def columns_from_arrow(
    data: pa.RecordBatch, layout: TrajectoryLayout | pa.Schema | None = None
) -> TrajectoryColumns:
    """Validated numpy views of a record batch (zero-copy but for a remapped source dictionary)."""
    validate_record_batch(data, layout)

    def values(name: str) -> np.ndarray:
        column = data.column(name)
        if isinstance(column.type, pa.FixedShapeTensorType):
            flat = column.storage.flatten().to_numpy(zero_copy_only=True)
            return flat.reshape(len(column), *column.type.shape)
        if isinstance(column.type, pa.DictionaryType):
            return column.indices.to_numpy(zero_copy_only=True)
        if isinstance(column.type, pa.TimestampType):
            column = column.view(pa.int64())
        return column.to_numpy(zero_copy_only=True)

    arrays = {name: values(name) for name in FIELD_NAMES if name in data.schema.names}
    arrays.setdefault("cond", None)
    source = data.column("source").dictionary
    if not source.equals(_SOURCE_DICTIONARY):  # another dictionary order: remap to Source codes
        remap = np.array([SOURCE_NAMES.index(s) for s in source.to_pylist()], np.int8)
        arrays["source"] = remap[arrays["source"]]
    return TrajectoryColumns(**arrays, run_names=data.column("run").dictionary.to_pylist(),
                             worker_names=data.column("worker").dictionary.to_pylist())


def to_arrow(batch: TrajectoryBatch, **kwargs: Any) -> pa.RecordBatch:
    """One Arrow row per trajectory (zero-copy for CPU contiguous tensors); ``kwargs``: those of
    :func:`columns_from_batch`. A replay store assigns its own ids on insert."""
    return columns_from_batch(batch, **kwargs).to_arrow()


def from_arrow(data: pa.RecordBatch | pa.Table) -> TrajectoryBatch:
    """The torch batch (zero-copy views for a record batch or single-chunk table; ids in
    ``extras["id"]``). run, worker and created_at are not part of the torch batch."""
    return columns_from_arrow(as_record_batch(data)).to_batch()


def as_record_batch(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """A table as one record batch (no copy when each column is a single chunk)."""
    if isinstance(data, pa.RecordBatch):
        return data
    batches = data.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=data.schema)
