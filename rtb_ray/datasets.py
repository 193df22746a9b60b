"""Small readers for image datasets stored on local disk (no downloads, no torchvision).

Every loader returns ``(images, labels)``: images float32 ``[N, C, H, W]`` scaled to [-1, 1],
labels int64 ``[N]``. Files are validated on read, and every error names the offending file.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
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
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = raw[4 + 4 * ndim :]
    expected = math.prod(dims)  # exact Python ints: a hostile header cannot overflow it
    if len(data) != expected:  # shorter means truncated; longer means the header is wrong
        raise ValueError(f"{path}: header {dims} needs {expected} data bytes, found {len(data)}")
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
# numpy 2 renamed numpy.core to numpy._core; resolve here once, never by the pickle's own name.
try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

# Pickle can call any importable function; a CIFAR batch needs only numpy array reconstruction.
# Protocol-5 pickles rebuild arrays with _frombuffer (a plain copy); older ones with _reconstruct.
_NUMPY_CORE = ("numpy.core", "numpy._core")
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{pkg}.multiarray", "_reconstruct"): _reconstruct for pkg in _NUMPY_CORE},
    **{(f"{pkg}.numeric", "_frombuffer"): _frombuffer for pkg in _NUMPY_CORE},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol <= 2 pickles spell bytes objects
}


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR batch never needs (possibly malicious)."""


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
        except (EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: truncated or corrupt pickle ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
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
