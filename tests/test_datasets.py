"""Round-trip and failure tests for rtb_ray.datasets on small generated files."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from rtb_ray.datasets import load_cifar10, load_images, load_mnist, load_sklearn_digits


def _unscale(images: np.ndarray) -> np.ndarray:
    """Invert the [-1, 1] scaling back to exact uint8 pixels."""
    return np.rint((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)


# --- MNIST -------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _mnist_arrays(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255  # pin both ends of the scale
    return pixels, np.arange(n, dtype=np.uint8) * 2 % 10


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(root: Path, prefix: str, pixels: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    _write(root / f"{prefix}-images-idx3-ubyte", _idx_bytes(pixels, 0x803), gz)
    _write(root / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels, 0x801), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path: Path, gz: bool) -> None:
    pixels, labels = _mnist_arrays()
    _write_mnist(tmp_path, "train", pixels, labels, gz)
    images, got = load_mnist(tmp_path)
    assert images.dtype == np.float32 and images.shape == (5, 1, 28, 28)
    assert got.dtype == np.int64 and got.tolist() == [0, 2, 4, 6, 8]
    assert images[0, 0, 0, 0] == -1.0 and images[0, 0, 0, 1] == 1.0
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(_unscale(images[:, 0]), pixels)
    expected = pixels.astype(np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(images[:, 0], expected, rtol=0, atol=1e-6)


def test_mnist_test_split_and_mixed_compression(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays(n=3, seed=1)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(pixels, 0x803), gz=True)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(labels, 0x801), gz=False)
    images, got = load_mnist(str(tmp_path), split="test")
    np.testing.assert_array_equal(_unscale(images[:, 0]), pixels)
    assert got.tolist() == [0, 2, 4]
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, split="train")  # only the test files exist


def test_mnist_wrong_magic(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays()
    _write_mnist(tmp_path, "train", pixels, labels, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x803))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: bad IDX magic 0x00000803"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated(tmp_path: Path, gz: bool) -> None:
    pixels, labels = _mnist_arrays()
    _write_mnist(tmp_path, "train", pixels, labels, gz=False)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(pixels, 0x803)[:-100], gz)
    match = r"train-images-idx3-ubyte.*needs 3920 data bytes, found 3820"
    with pytest.raises(ValueError, match=match):
        load_mnist(tmp_path)


def test_mnist_truncated_header(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays()
    _write_mnist(tmp_path, "train", pixels, labels, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: truncated IDX header"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays()
    _write_mnist(tmp_path, "train", pixels, labels[:4], gz=False)
    with pytest.raises(ValueError, match="5 images but .*train-labels-idx1-ubyte: 4 labels"):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays()
    labels[3] = 10
    _write_mnist(tmp_path, "train", pixels, labels, gz=True)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 10 is outside 0..9"):
        load_mnist(tmp_path)


def test_mnist_missing(tmp_path: Path) -> None:
    missing_dir = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(missing_dir)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(missing_dir) in msg


# --- CIFAR-10 ----------------------------------------------------------------------------------


def _cifar_batch(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return data, [(seed + i) % 10 for i in range(n)]


def _write_cifar(
    folder: Path, name: str, data: np.ndarray, labels: list[int], protocol: int = 4
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # the same keys as a real batch; the loader must ignore the ones it does not need
    batch = {b"batch_label": b"test", b"labels": labels, b"data": data}
    batch[b"filenames"] = [b"a.png"] * len(labels)
    with open(folder / name, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def _write_cifar_split(folder: Path) -> list[tuple[np.ndarray, list[int]]]:
    batches = [_cifar_batch(n=i + 1, seed=i) for i in range(5)]
    for i, (data, labels) in enumerate(batches, start=1):
        _write_cifar(folder, f"data_batch_{i}", data, labels, protocol=[2, 3, 4, 5, 4][i - 1])
    return batches


@pytest.mark.parametrize("subdir", [False, True])
def test_cifar10_round_trip(tmp_path: Path, subdir: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py" if subdir else tmp_path
    batches = _write_cifar_split(folder)
    images, labels = load_cifar10(tmp_path)
    assert images.dtype == np.float32 and images.shape == (15, 3, 32, 32)
    assert labels.dtype == np.int64
    assert labels.tolist() == [lab for _, labs in batches for lab in labs]
    raw = np.concatenate([d for d, _ in batches])
    np.testing.assert_array_equal(_unscale(images).reshape(15, 3072), raw)
    # channel layout: row = R plane, then G plane, then B plane, each 32x32 row-major
    assert _unscale(images)[1, 1, 2, 3] == raw[1, 1024 + 2 * 32 + 3]
    assert _unscale(images)[4, 2, 31, 31] == raw[4, 3071]


def test_cifar10_test_split(tmp_path: Path) -> None:
    data, labels = _cifar_batch(n=3, seed=7)
    data[0, :2] = (0, 255)
    _write_cifar(tmp_path, "test_batch", data, labels)
    images, got = load_cifar10(tmp_path, split="test")
    assert images.shape == (3, 3, 32, 32) and got.tolist() == [7, 8, 9]
    assert images[0, 0, 0, 0] == -1.0 and images[0, 0, 0, 1] == 1.0
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, split="train")


def test_cifar10_numpy1_global_names(tmp_path: Path) -> None:
    """Real CIFAR files name numpy.core.multiarray._reconstruct (written before numpy 2)."""
    data, labels = _cifar_batch(n=2, seed=3)
    raw = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in raw  # GLOBAL names are newline-terminated
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "test_batch").write_bytes(raw)
    images, got = load_cifar10(tmp_path, split="test")
    np.testing.assert_array_equal(_unscale(images).reshape(2, 3072), data)
    assert got.tolist() == [3, 4]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"echo pwned > {self.marker}",))


def test_cifar10_refuses_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    match = r"test_batch: refusing to load global (posix|nt)\.system"
    with pytest.raises(pickle.UnpicklingError, match=match):
        load_cifar10(tmp_path, split="test")
    assert not marker.exists()


def test_cifar10_refuses_builtins_eval(tmp_path: Path) -> None:
    class EvalPayload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (eval, ("1 + 1",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": EvalPayload()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        load_cifar10(tmp_path, split="test")


_BAD_DATA = r"b'data' must be uint8 \[N, 3072\], got "


@pytest.mark.parametrize(
    "data, labels, match",
    [
        (np.zeros((2, 3072), np.float32), [0, 1], _BAD_DATA + r"float32 \(2, 3072\)"),
        (np.zeros((2, 1024), np.uint8), [0, 1], _BAD_DATA + r"uint8 \(2, 1024\)"),
        (np.zeros((3072,), np.uint8), [0], _BAD_DATA + r"uint8 \(3072,\)"),
        (np.zeros((2, 3072), np.uint8), [0], r"2 images, b'labels' is int64 \(1,\)"),
        (np.zeros((2, 3072), np.uint8), [0, 10], r"label 10 is outside 0..9"),
        (np.zeros((2, 3072), np.uint8), [-1, 0], r"label -1 is outside 0..9"),
    ],
)
def test_cifar10_invalid_batch(
    tmp_path: Path, data: np.ndarray, labels: list[int], match: str
) -> None:
    _write_cifar(tmp_path, "test_batch", data, labels)
    with pytest.raises(ValueError, match=r"test_batch: " + match):
        load_cifar10(tmp_path, split="test")


def test_cifar10_missing_key_and_truncated(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [0]}))
    with pytest.raises(ValueError, match="test_batch: expected a dict with keys b'data' and b'lab"):
        load_cifar10(tmp_path, split="test")
    data, labels = _cifar_batch(n=2, seed=0)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": labels})[:500])
    with pytest.raises(ValueError, match="test_batch: truncated or corrupt pickle"):
        load_cifar10(tmp_path, split="test")
    (tmp_path / "test_batch").write_bytes(b"")
    with pytest.raises(ValueError, match="test_batch: truncated or corrupt pickle"):
        load_cifar10(tmp_path, split="test")


def test_cifar10_missing(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "data_batch_1", *_cifar_batch(n=1, seed=0))
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path)
    msg = str(err.value)
    assert "data_batch_5" in msg and str(tmp_path) in msg and "cifar-10-batches-py" in msg


# --- sklearn digits and dispatch ---------------------------------------------------------------


def test_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_sklearn_digits()
    assert images.dtype == np.float32 and images.shape == (1797, 1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))
    raw = load_digits()
    np.testing.assert_array_equal((images[:, 0] + 1) * 8, raw.images)
    np.testing.assert_array_equal(labels, raw.target)


def test_load_images_dispatch(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays()
    _write_mnist(tmp_path, "train", pixels, labels, gz=True)
    images, got = load_images("mnist", tmp_path)
    np.testing.assert_array_equal(_unscale(images[:, 0]), pixels)
    assert got.tolist() == [0, 2, 4, 6, 8]
    assert load_images("digits", None)[0].shape == (1797, 1, 8, 8)
    _write_cifar(tmp_path, "test_batch", *_cifar_batch(n=2, seed=5))
    assert load_images("cifar10", tmp_path, split="test")[1].tolist() == [5, 6]


@pytest.mark.parametrize(
    "source, root, split, match",
    [
        ("mnist", None, "train", "'mnist' needs root="),
        ("cifar10", None, "test", "'cifar10' needs root="),
        ("imagenet", "x", "train", "unknown image source 'imagenet'"),
        ("digits", None, "test", "digits has no test split"),
        ("mnist", "x", "val", "split must be 'train' or 'test', got 'val'"),
    ],
)
def test_load_images_bad_arguments(source: str, root: str | None, split: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_images(source, root, split)  # type: ignore[arg-type]


class _CraftedDtype:
    """numpy.dtype('u1') with a forged BUILD state (an element size numpy trusts): given to
    numpy's own __setstate__ this crashed the interpreter (exit 139)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (np.dtype, ("u1", False, True), (3, "|", None, None, None, 1 << 30, 1, 0))


class _ArrayWithCraftedDtype:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def __reduce__(self):  # type: ignore[no-untyped-def]
        from numpy._core.multiarray import _reconstruct

        state = (1, self.data.shape, _CraftedDtype(), False, self.data.tobytes())
        return (_reconstruct, (np.ndarray, (0,), b"b"), state)


def test_cifar10_forged_numpy_state_never_reaches_numpy(tmp_path: Path) -> None:
    data, labels = _cifar_batch(n=2, seed=5)
    raw = pickle.dumps({b"data": _ArrayWithCraftedDtype(data), b"labels": labels}, protocol=2)
    assert b"numpy\ndtype" in raw and b"_reconstruct" in raw
    (tmp_path / "test_batch").write_bytes(raw)
    # numpy itself would take the forged element size; the reader refuses it, in one line
    with pytest.raises(ValueError, match=r"test_batch: dtype 'u1' with state .* is not a plain"):
        load_cifar10(tmp_path, split="test")


@pytest.mark.parametrize("state", [
    (1, (2, 3072), "not a dtype", False, b"\0" * 6144),   # dtype of another kind
    (1, (2, 3072), None, False, b"\0" * 10),             # too few bytes for the shape
    (1, (-1,), None, False, b"\0"),                      # negative dimension
    (1, (2, 3072)),                                      # truncated state
])
def test_cifar10_malformed_array_states_are_one_line(tmp_path: Path, state: tuple) -> None:
    from numpy._core.multiarray import _reconstruct

    class Forged:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            full = state if state[2:3] != (None,) else (*state[:2], np.dtype("u1"), *state[3:])
            return (_reconstruct, (np.ndarray, (0,), b"b"), full)

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Forged(), b"labels": [0, 1]},
                                                       protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: ") as err:
        load_cifar10(tmp_path, split="test")
    assert "\n" not in str(err.value)


def test_mnist_gzip_bomb_stops_at_the_size_the_header_promises(tmp_path: Path) -> None:
    pixels, labels = _mnist_arrays(n=2)
    _write_mnist(tmp_path, "train", pixels, labels, gz=False)
    bomb = tmp_path / "train-images-idx3-ubyte"
    with gzip.open(bomb.with_name(bomb.name + ".gz"), "wb") as f:  # 2 images, then 64 MiB more
        f.write(_idx_bytes(pixels, 0x803))
        for _ in range(64):
            f.write(bytes(1 << 20))
    bomb.unlink()
    assert (tmp_path / "train-images-idx3-ubyte.gz").stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=r"needs 1568 data bytes, found more"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("content", [b"not gzip at all", b"\x1f\x8b\x08\x00"])  # junk, truncated
def test_mnist_bad_gzip_is_one_line(tmp_path: Path, content: bytes) -> None:
    pixels, labels = _mnist_arrays(n=2)
    _write_mnist(tmp_path, "train", pixels, labels, gz=False)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(content)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: ") as err:
        load_mnist(tmp_path)
    assert "\n" not in str(err.value)
