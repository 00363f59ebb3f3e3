"""Data for the experiments: IDX files (MNIST, Fashion-MNIST), sklearn's 8x8 digits, pairs.

Nothing is downloaded at run time.

- **Fashion-MNIST / MNIST** are read from IDX files (gzipped or raw) in a directory: by default
  ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts
  them; any directory holding ``train-images-idx3-ubyte(.gz)``, ``train-labels-idx1-ubyte(.gz)``,
  ``t10k-images-idx3-ubyte(.gz)`` and ``t10k-labels-idx1-ubyte(.gz)`` works (``--data-dir``),
  so real MNIST works too.  Pixels are scaled to [0, 1] (divided by 255).
- **8x8 digits** ship inside scikit-learn (``sklearn.datasets.load_digits``): the embedded
  default.  Pixels are scaled to [0, 1] (divided by 16) and split deterministically from a seed.
- **Binary pair tasks** (:data:`PAIR_TASKS`) select two classes; the first class named gets
  label 1, the second label 0 (e.g. ``digits_3v5``: 3 -> 1, 5 -> 0).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"

INSTALL_HINT = (
    "Install Debian's Fashion-MNIST package with `sudo apt-get install dataset-fashion-mnist` "
    f"(it puts the IDX files in {DEFAULT_FASHION_DIR}), or point --data-dir at a directory "
    "holding train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
    "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) (Fashion-MNIST or MNIST)."
)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class DataNotFoundError(FileNotFoundError):
    """A data file or directory is missing; the message says how to get it."""


class IDXFormatError(ValueError):
    """A file is not a valid IDX file (bad header, truncated, or corrupt gzip)."""


# ----------------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DataNotFoundError(f"IDX file not found: {path}. {INSTALL_HINT}") from e
    if raw[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise IDXFormatError(
                f"{path}: the name ends in .gz but the file is not gzip data (it starts with "
                f"{raw[:4].hex() or 'nothing'}); the file is corrupt or misnamed."
            )
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise IDXFormatError(
            f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e}). Re-download or "
            f"reinstall it. {INSTALL_HINT}"
        ) from e


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parses the bytes of an IDX file into a numpy array of its native dtype and shape.

    The header is 4 magic bytes ``0, 0, type code, ndim``, then ``ndim`` big-endian uint32
    dimensions, then the data in big-endian order.
    """
    if len(data) < 4:
        raise IDXFormatError(f"{source}: too short for an IDX header ({len(data)} bytes).")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(
            f"{source}: bad IDX magic number {data[:4].hex()} (the first two bytes must be 0)."
        )
    if code not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{source}: unknown IDX data type code 0x{code:02x} (expected one of "
            f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})."
        )
    if ndim == 0:
        raise IDXFormatError(f"{source}: IDX header declares 0 dimensions.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(
            f"{source}: truncated IDX header ({len(data)} bytes, {ndim} dims need {header})."
        )
    dims = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(
            f"{source}: IDX payload has {len(data) - header} bytes but the header "
            f"(type 0x{code:02x}, dims {dims}) needs {expected}; the file is truncated or corrupt."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def find_idx_file(data_dir: str | os.PathLike, name: str) -> Path:
    """Returns ``data_dir/name`` or ``data_dir/name.gz``, whichever exists (raw first)."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataNotFoundError(f"Data directory not found: {directory}. {INSTALL_HINT}")
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"Neither {name} nor {name}.gz is in {directory}. {INSTALL_HINT}"
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file, gzipped or raw (detected from the content), into a numpy array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), source=str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Writes ``array`` as an IDX file (gzipped when ``compress`` or the name ends in .gz)."""
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX type code.")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(
        array.shape, dtype=">u4"
    ).tobytes()
    payload = header + array.astype(native.newbyteorder(">")).tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)


def load_idx_dataset(
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads an MNIST-format data set: ``(x_train, y_train, x_test, y_test)``.

    Images are flattened to float64 rows in [0, 1] (uint8 / 255); labels are int64.
    ``data_dir`` defaults to Debian's Fashion-MNIST location.
    """
    data_dir = DEFAULT_FASHION_DIR if data_dir is None else data_dir
    arrays = {key: read_idx(find_idx_file(data_dir, name)) for key, name in IDX_FILES.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim < 2 or labels.ndim != 1 or len(images) != len(labels):
            raise IDXFormatError(
                f"{data_dir}: {split} images {images.shape} and labels {labels.shape} do not "
                "match (expected images (n, rows, cols) and labels (n,))."
            )
        x = images.reshape(len(images), -1).astype(np.float64)
        if images.dtype == np.uint8:
            x /= 255.0
        out += [x, labels.astype(np.int64)]
    return tuple(out)


# ----------------------------------------------------------------------------------- digits


def load_digits(
    *, seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: ``(x_train, y_train, x_test, y_test)``.

    Pixels are scaled to [0, 1] (the raw maximum is 16).  The split is stratified per class and
    deterministic given ``seed``; rows within each split are in a seeded random order.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction}.")
    bunch = _sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    return stratified_split(x, y, test_fraction=test_fraction, seed=seed)


def stratified_split(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Splits each class with a seeded permutation; returns shuffled train and test parts."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ------------------------------------------------------------------------------ pair tasks

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclasses.dataclass(frozen=True)
class PairTask:
    """A binary task: ``positive`` gets label 1, ``negative`` label 0."""

    name: str
    dataset: str  # "fashion" (IDX directory) or "digits" (sklearn)
    positive: int
    negative: int
    title: str


PAIR_TASKS = {
    t.name: t
    for t in (
        PairTask("fashion_shirt_v_tshirt", "fashion", 6, 0, "Fashion shirt v T-shirt/top"),
        PairTask("fashion_pullover_v_coat", "fashion", 2, 4, "Fashion pullover v coat"),
        PairTask("digits_3v5", "digits", 3, 5, "digits 3 v 5"),
        PairTask("digits_4v9", "digits", 4, 9, "digits 4 v 9"),
    )
}


def binary_pair(
    x: np.ndarray, y: np.ndarray, positive: int, negative: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the rows of two classes; labels become 1 for ``positive`` and 0 for ``negative``."""
    if positive == negative:
        raise ValueError(f"binary_pair: the two classes must differ, got {positive} twice.")
    keep = (y == positive) | (y == negative)
    if not np.any(y == positive) or not np.any(y == negative):
        raise ValueError(
            f"binary_pair: class {positive if not np.any(y == positive) else negative} has no "
            f"samples (labels present: {sorted(np.unique(y).tolist())})."
        )
    return x[keep], (y[keep] == positive).astype(np.int64)


def load_pair_task(
    name: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of a task in :data:`PAIR_TASKS`, labels in {0, 1}.

    ``data_dir`` is used by the IDX tasks (default: Debian's Fashion-MNIST directory); ``seed``
    fixes the digits split.
    """
    if name not in PAIR_TASKS:
        raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(PAIR_TASKS)}.")
    task = PAIR_TASKS[name]
    if task.dataset == "digits":
        x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
    else:
        x_tr, y_tr, x_te, y_te = load_idx_dataset(data_dir)
    return (*binary_pair(x_tr, y_tr, task.positive, task.negative),
            *binary_pair(x_te, y_te, task.positive, task.negative))


# --------------------------------------------------------------------- subsets and batches


def subsample(
    x: np.ndarray, y: np.ndarray, size: int | None, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of ``size`` rows (all rows, shuffled, when ``size`` is None)."""
    n = len(x)
    if size is None:
        size = n
    if not 0 < size <= n:
        raise ValueError(f"subsample: size must be in [1, {n}], got {size}.")
    idx = np.random.default_rng(seed).permutation(n)[:size]
    return x[idx], y[idx]


def minibatch_indices(
    n: int, batch_size: int, *, seed: int, epoch: int = 0, drop_remainder: bool = True
) -> list[np.ndarray]:
    """The minibatch row indices of one epoch: a permutation seeded by ``(seed, epoch)``.

    With ``drop_remainder`` the last ``n % batch_size`` rows of the permutation are skipped
    (they differ every epoch, so every row is still seen).
    """
    if not 0 < batch_size:
        raise ValueError(f"minibatch_indices: batch_size must be positive, got {batch_size}.")
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"minibatch_indices: batch_size {batch_size} exceeds the {n} samples and "
            "drop_remainder=True would give no batch."
        )
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    stop = (n // batch_size) * batch_size if drop_remainder else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def iterate_minibatches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    num_epochs: int = 1,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x_batch, y_batch)`` for ``num_epochs`` epochs, reshuffled every epoch."""
    if len(x) != len(y):
        raise ValueError(f"iterate_minibatches: {len(x)} inputs but {len(y)} labels.")
    for epoch in range(num_epochs):
        for idx in minibatch_indices(len(x), batch_size, seed=seed, epoch=epoch,
                                     drop_remainder=drop_remainder):
            yield x[idx], y[idx]


# ---------------------------------------------------------------------------------- fortunes

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"


def load_text(path: str | os.PathLike | None = None) -> str:
    """English text for a character-level model: Debian's ``fortunes`` (about 2.5 MB).

    ``path`` is a text file or a directory; for a directory (default
    ``/usr/share/games/fortunes``) every plain file is read in name order, skipping the
    ``.dat`` indices and ``.u8`` copies.  Bytes are decoded as Latin-1 and every character
    outside printable ASCII, newline and tab becomes a space, so the vocabulary stays small.

    Raises:
      DataNotFoundError: if there is no such file or directory, or it holds no text, naming
        the apt command that installs the corpus.
    """
    path = Path(DEFAULT_FORTUNES_DIR if path is None else path)
    hint = ("Install Debian's corpus with `sudo apt-get install fortunes` (it puts the text in "
            f"{DEFAULT_FORTUNES_DIR}), or pass a text file or directory of your own.")
    if not path.exists():
        raise DataNotFoundError(f"{path}: no such file or directory. {hint}")
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    text = "".join(p.read_bytes().decode("latin-1") for p in files)
    text = "".join(c if (" " <= c <= "~" or c in "\n\t") else " " for c in text)
    if not text:
        raise DataNotFoundError(f"{path}: holds no text. {hint}")
    return text


def encode_text(text: str) -> tuple[np.ndarray, list[str]]:
    """Characters as int32 ids over the sorted vocabulary; returns ``(ids, vocab)``."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((index[c] for c in text), np.int32, len(text)), vocab
