"""Small readers for datasets stored on local disk (no downloads, no torchvision).

Every image loader returns ``(images, labels)``: images float32 ``[N, C, H, W]`` scaled to
[-1, 1], labels int64 ``[N]``. ``read_npz`` reads any .npz of named arrays without pickle. Files
are validated on read, and every error names the offending file.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

Split = Literal["train", "test"]
Arrays = tuple[np.ndarray, np.ndarray]

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_NUM_CLASSES = 10


def read_npz(path: Path, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str]:
    """Every array of an .npz file (unchecked) and the file's sha256, read without pickle: an
    object array is refused, never unpickled. Errors are one line starting ``dataset <path>:``
    (``keys``, the arrays expected, only name what a lone .npy file lacks)."""
    where = f"dataset {path}"
    try:
        raw = path.read_bytes()
        # by its first bytes: on anything else np.load tries pickle and suggests allowing it
        if raw.startswith(b"\x93NUMPY"):
            raise ValueError(f"not an .npz archive (one .npy array, not the keys "
                             f"{', '.join(keys)})")
        if not raw.startswith(b"PK"):
            raise ValueError("not an .npz archive (a zip of .npy arrays)")
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            data = {k: _npz_key(npz, k, where) for k in npz.files}
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{where}: cannot be read as an .npz archive ({type(err).__name__}: "
                         f"{first})") from None
    except ValueError as err:
        msg = str(err).splitlines()[0]
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    return data, hashlib.sha256(raw).hexdigest()


def _npz_key(npz: Any, key: str, where: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as err:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{where}: key {key!r}: {str(err).splitlines()[0]}") from None


def _scale_uint8(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0) * 2.0 - 1.0


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= _NUM_CLASSES)][0]
        raise ValueError(f"{path}: label {int(bad)} is outside 0..{_NUM_CLASSES - 1}")
    return labels.astype(np.int64)


def load_sklearn_digits() -> Arrays:
    """The 1797 8x8 digits that ship with scikit-learn: [1797, 1, 8, 8]; raw 0..16 -> x/8 - 1."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None, :, :]
    return images, digits.target.astype(np.int64)


# MNIST: IDX files (http://yann.lecun.com/exdb/mnist/): big-endian magic, dims, then uint8 data.
def _find(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header ({len(header)} bytes)")
            found = int.from_bytes(header[:4], "big")
            if found != magic:
                raise ValueError(f"{path}: bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
            dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4", offset=4))
            expected = math.prod(dims)  # exact Python ints: a hostile header cannot overflow it
            if opener is open and path.stat().st_size - len(header) != expected:
                found = path.stat().st_size - len(header)
            else:  # inflate no more than the header promises (a gzip bomb stops here)
                found = len(data := f.read(expected + 1))
    except (OSError, EOFError) as err:  # not gzip, truncated stream, unreadable
        raise ValueError(f"{path}: cannot be read ({err})") from None
    if found != expected:  # shorter means truncated; longer means the header is wrong
        raise ValueError(f"{path}: header {dims} needs {expected} data bytes, found "
                         f"{'more' if found > expected else found}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def load_mnist(root: str | Path, split: Split = "train") -> Arrays:
    """MNIST from the standard IDX files in ``root``, each optionally ``.gz``: [N, 1, 28, 28]."""
    _check_split(split)
    root = Path(root)
    names = _MNIST_FILES[split]
    paths = [_find(root, name) for name in names]
    if None in paths:
        missing = [n for n, p in zip(names, paths) if p is None]
        raise FileNotFoundError(f"MNIST {split} files {missing} (or .gz) not found in {root}")
    image_path, label_path = (p for p in paths if p is not None)
    images = _read_idx(image_path, 0x00000803, ndim=3)
    labels = _read_idx(label_path, 0x00000801, ndim=1)
    if len(images) != len(labels):
        counts = f"{len(images)} images but {label_path}: {len(labels)} labels"
        raise ValueError(f"count mismatch: {image_path}: {counts}")
    return _scale_uint8(images)[:, None, :, :], _check_labels(labels, label_path)


# CIFAR-10 "python version" (https://www.cs.toronto.edu/~kriz/cifar.html): pickled dict batches.
# Pickle can call any importable function, and even numpy's own array and dtype reconstruction
# (``__setstate__``) crashes the interpreter on crafted states. So nothing of numpy runs while
# unpickling: arrays and dtypes are loaded as inert stubs that only record their arguments, and
# are built afterwards from validated plain values (a shape, a numeric dtype, a byte string).
_NUMPY_CORE = ("numpy.core", "numpy._core")
_PLAIN_DTYPES = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"}


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR batch never needs (possibly malicious)."""


class _Stub:
    """An array or dtype as the pickle describes it: constructor arguments, then its state."""

    def __init__(self, *args: Any) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DtypeStub(_Stub):
    def build(self) -> np.dtype:
        spec = self.args[0] if self.args and isinstance(self.args[0], str) else None
        # a plain number type's state is exactly (3, order, None, None, None, -1, -1, 0)
        state = self.state if isinstance(self.state, tuple) and len(self.state) == 8 else ()
        order = state[1] if state and isinstance(state[1], str) else None
        if spec not in _PLAIN_DTYPES or order not in ("<", ">", "|", "=") or (
                state[:1] + state[2:] != (3, None, None, None, -1, -1, 0)):
            raise ValueError(f"dtype {spec!r} with state {self.state!r} is not a plain number "
                             f"type")
        return np.dtype(spec).newbyteorder(order if order in "<>" else "=")


class _ArrayStub(_Stub):
    def build(self) -> np.ndarray:  # ndarray.__reduce__'s state: (1, shape, dtype, fortran, raw)
        if not (isinstance(self.state, tuple) and len(self.state) == 5):
            raise ValueError("malformed array state")
        _, shape, dtype, fortran, raw = self.state
        return _array(raw, dtype, shape, "F" if fortran is True else "C")


def _array(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not (isinstance(dtype, _DtypeStub) and isinstance(raw, (bytes, bytearray))
            and isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError("malformed array")
    dt = dtype.build()
    if len(raw) != math.prod(shape) * dt.itemsize:
        raise ValueError(f"array of shape {shape} needs {math.prod(shape) * dt.itemsize} bytes, "
                         f"has {len(raw)}")
    return np.frombuffer(bytes(raw), dt).reshape(shape, order="F" if order == "F" else "C")


def _reconstruct(cls: Any, *_: Any) -> _ArrayStub:
    if cls is not _ArrayStub:
        raise ValueError("array reconstruction of another class")
    return _ArrayStub()


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{pkg}.multiarray", "_reconstruct"): _reconstruct for pkg in _NUMPY_CORE},
    # protocol 5 pickles rebuild arrays with _frombuffer(raw, dtype, shape, order)
    **{(f"{pkg}.numeric", "_frombuffer"): _array for pkg in _NUMPY_CORE},
    ("numpy", "ndarray"): _ArrayStub,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): codecs.encode,  # how protocol <= 2 pickles spell bytes objects
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            msg = f"{self.path}: refusing to load global {module}.{name} (a CIFAR batch needs none)"
            raise RefusedGlobalError(msg) from None


def _read_cifar_batch(path: Path) -> Arrays:
    with open(path, "rb") as f:
        try:
            batch = _RestrictedUnpickler(f, path).load()
        except RefusedGlobalError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
                KeyError, AttributeError, MemoryError) as e:  # what a crafted stream can raise
            raise ValueError(f"{path}: truncated or corrupt pickle ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'")
    try:
        data, labels = (v.build() if isinstance(v, _Stub) else v
                        for v in (batch[b"data"], batch[b"labels"]))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise ValueError(f"{path}: b'labels' must be integers")
    labels = np.asarray(labels)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {desc}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {len(data)} images, b'labels' is {labels.dtype} {labels.shape}")
    # rows hold the R, G and B planes of a 32x32 image in turn, each row-major
    return data.reshape(-1, 3, 32, 32), _check_labels(labels, path)


def load_cifar10(root: str | Path, split: Split = "train") -> Arrays:
    """CIFAR-10 batches in ``root`` or ``root/cifar-10-batches-py``: [N, 3, 32, 32]."""
    _check_split(split)
    root = Path(root)
    names = _CIFAR_FILES[split]
    dirs = (root, root / "cifar-10-batches-py")  # the folder the official tarball unpacks to
    folder = next((d for d in dirs if all((d / n).is_file() for n in names)), None)
    if folder is None:
        raise FileNotFoundError(f"CIFAR-10 {split} files {list(names)} not in {root} or {dirs[1]}")
    batches = [_read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([b[0] for b in batches])
    return _scale_uint8(images), np.concatenate([b[1] for b in batches])


def load_images(
    source: Literal["digits", "mnist", "cifar10"],
    root: str | Path | None = None,
    split: Split = "train",
) -> Arrays:
    """Dispatch to a loader by name. ``root`` is required for mnist and cifar10.

    sklearn digits has no test split, so ``split="test"`` is an error rather than a silent reuse.
    """
    _check_split(split)
    if source == "digits":
        if split != "train":
            raise ValueError("sklearn digits has no test split; use split='train'")
        return load_sklearn_digits()
    if source not in ("mnist", "cifar10"):
        raise ValueError(f"unknown image source {source!r}; expected digits, mnist or cifar10")
    if root is None:
        raise ValueError(f"image source {source!r} needs root= (a local directory with its files)")
    return load_mnist(root, split) if source == "mnist" else load_cifar10(root, split)
