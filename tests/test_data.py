"""Tests of experiments/data.py (IDX files, digits, pairs, batches) and the tau-sharp ratio."""

import gzip
import math
import struct

import numpy as np
import pytest

from experiments import common, data


def _write_raw_idx(path, array: np.ndarray, code: int) -> None:
    """An IDX writer written from the format description, independent of data.write_idx."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _make_dataset(tmp_path, *, gz: bool, n_train=12, n_test=5, rows=3, cols=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, rows, cols), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, rows, cols), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for key, name in data.IDX_FILES.items():
        raw = tmp_path / name
        _write_raw_idx(raw, arrays[key], 0x08)
        if gz:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
            raw.unlink()
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_load_idx_dataset_round_trip(tmp_path, gz):
    arrays = _make_dataset(tmp_path, gz=gz)
    x_tr, y_tr, x_te, y_te = data.load_idx_dataset(tmp_path)
    np.testing.assert_allclose(x_tr, arrays["train_images"].reshape(12, 12) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x_te, arrays["test_images"].reshape(5, 12) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_tr, arrays["train_labels"])
    np.testing.assert_array_equal(y_te, arrays["test_labels"])
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0
    assert y_tr.dtype == np.int64


@pytest.mark.parametrize(
    "dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                   (np.float32, 0x0D), (np.float64, 0x0E)]
)
def test_read_idx_dtypes(tmp_path, dtype, code):
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(2, 3, 5)) * 50).astype(dtype)
    _write_raw_idx(tmp_path / "a.idx", arr, code)
    got = data.read_idx(tmp_path / "a.idx")
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, arr)
    # data.write_idx produces the same bytes as the reference writer.
    data.write_idx(tmp_path / "b.idx", arr)
    assert (tmp_path / "b.idx").read_bytes() == (tmp_path / "a.idx").read_bytes()
    data.write_idx(tmp_path / "c.idx.gz", arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "c.idx.gz"), arr)


def test_raw_file_preferred_and_gz_found(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    _write_raw_idx(tmp_path / "x", arr, 0x08)
    assert data.find_idx_file(tmp_path, "x").name == "x"
    (tmp_path / "y.gz").write_bytes(gzip.compress((tmp_path / "x").read_bytes()))
    assert data.find_idx_file(tmp_path, "y").name == "y.gz"


def test_missing_directory_and_file_errors(tmp_path):
    with pytest.raises(data.DataNotFoundError,
                       match=r"Data directory not found.*apt-get install dataset-fashion-mnist"):
        data.load_idx_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\(\.gz\)"):
        data.load_idx_dataset(tmp_path)  # exists but is empty
    _make_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataNotFoundError,
                       match=r"Neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte\.gz"):
        data.load_idx_dataset(tmp_path)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    _make_dataset(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(data.IDXFormatError, match="corrupt or truncated gzip file"):
        data.load_idx_dataset(tmp_path)
    path.write_bytes(blob[:10] + bytes(len(blob) - 10))  # garbage payload
    with pytest.raises(data.IDXFormatError, match="corrupt or truncated gzip file"):
        data.read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.IDXFormatError, match="ends in .gz but the file is not gzip data"):
        data.read_idx(path)


@pytest.mark.parametrize(
    "blob,match",
    [
        (b"\x00\x00", "too short for an IDX header"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "bad IDX magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX data type code 0x07"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "payload has 2 bytes but the header"),
        (b"\x00\x00\x0c\x01\x00\x00\x00\x01\x01\x02\x03\x04\x05", "payload has 5 bytes"),
    ],
)
def test_bad_headers(tmp_path, blob, match):
    path = tmp_path / "bad-idx"
    path.write_bytes(blob)
    with pytest.raises(data.IDXFormatError, match=match):
        data.read_idx(path)


def test_mismatched_images_and_labels(tmp_path):
    _make_dataset(tmp_path, gz=False)
    _write_raw_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, np.uint8), 0x08)
    with pytest.raises(data.IDXFormatError, match=r"train images \(12, 3, 4\) and labels \(7,\)"):
        data.load_idx_dataset(tmp_path)


def test_default_location_is_debian_package():
    assert data.DEFAULT_FASHION_DIR == "/usr/share/datasets/fashion-mnist"
    assert issubclass(data.DataNotFoundError, FileNotFoundError)


# ------------------------------------------------------------------------------- digits


def test_digits_shapes_scale_and_determinism():
    from sklearn.datasets import load_digits as sk_digits

    x_tr, y_tr, x_te, y_te = data.load_digits(seed=3)
    assert x_tr.shape[1] == 64 and x_te.shape[1] == 64
    assert len(x_tr) + len(x_te) == 1797
    assert abs(len(x_te) - 0.25 * 1797) < 10
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0
    # Stratified: every class is in both splits with about the same share.
    for c in range(10):
        assert abs(np.mean(y_tr == c) - np.mean(y_te == c)) < 0.02
    again = data.load_digits(seed=3)
    for a, b in zip((x_tr, y_tr, x_te, y_te), again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = data.load_digits(seed=4)
    assert not np.array_equal(other[1], y_tr)
    # The split is a partition of sklearn's rows, scaled by 1/16.
    raw = sk_digits()
    rows = {tuple((r * 16).round().astype(int)) for r in np.concatenate([x_tr, x_te])}
    assert rows == {tuple(r.astype(int)) for r in raw.data}


@pytest.mark.parametrize(
    "name,pos,neg", [("digits_3v5", 3, 5), ("digits_4v9", 4, 9)]
)
def test_digit_pair_tasks(name, pos, neg):
    x_tr, y_tr, x_te, y_te = data.load_pair_task(name, seed=0)
    full = data.load_digits(seed=0)
    expected = full[1][(full[1] == pos) | (full[1] == neg)]
    np.testing.assert_array_equal(y_tr, (expected == pos).astype(int))
    assert set(np.unique(y_tr)) == {0, 1} and set(np.unique(y_te)) == {0, 1}
    assert len(x_tr) == len(y_tr) and len(x_te) == len(y_te)


def test_pair_task_table():
    assert data.PAIR_TASKS["fashion_shirt_v_tshirt"].positive == 6
    assert data.PAIR_TASKS["fashion_shirt_v_tshirt"].negative == 0
    assert data.PAIR_TASKS["fashion_pullover_v_coat"].positive == 2
    assert data.PAIR_TASKS["fashion_pullover_v_coat"].negative == 4
    assert data.FASHION_CLASSES[6] == "Shirt" and data.FASHION_CLASSES[4] == "Coat"
    with pytest.raises(ValueError, match="Unknown task 'mnist_1v7'"):
        data.load_pair_task("mnist_1v7")


def test_fashion_pair_from_idx_dir(tmp_path):
    arrays = _make_dataset(tmp_path, gz=True, n_train=40, n_test=20, seed=5)
    x_tr, y_tr, _, _ = data.load_pair_task("fashion_pullover_v_coat", data_dir=tmp_path)
    labels = arrays["train_labels"]
    keep = (labels == 2) | (labels == 4)
    np.testing.assert_array_equal(y_tr, (labels[keep] == 2).astype(int))
    np.testing.assert_allclose(x_tr, arrays["train_images"][keep].reshape(-1, 12) / 255.0,
                               rtol=1e-6)


def test_binary_pair_errors():
    x = np.zeros((4, 2))
    y = np.array([1, 1, 2, 2])
    with pytest.raises(ValueError, match="class 3 has no samples"):
        data.binary_pair(x, y, 1, 3)
    with pytest.raises(ValueError, match="must differ"):
        data.binary_pair(x, y, 1, 1)


# ----------------------------------------------------------------------- subsets, batches


def test_subsample_deterministic():
    x = np.arange(40).reshape(20, 2)
    y = np.arange(20)
    a = data.subsample(x, y, 7, seed=1)
    b = data.subsample(x, y, 7, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0][:, 0] // 2, a[1])  # rows stay paired
    assert len(np.unique(a[1])) == 7
    assert sorted(data.subsample(x, y, None, seed=0)[1]) == list(range(20))
    with pytest.raises(ValueError, match=r"size must be in \[1, 20\], got 21"):
        data.subsample(x, y, 21, seed=0)


@pytest.mark.parametrize("n,batch", [(10, 3), (12, 4), (7, 7)])
def test_minibatches(n, batch):
    x = np.arange(n)[:, None] * 1.0
    y = np.arange(n)
    epochs = 3
    seen = []
    batches = list(data.iterate_minibatches(x, y, batch, seed=2, num_epochs=epochs))
    assert len(batches) == epochs * (n // batch)
    for xb, yb in batches:
        assert xb.shape == (batch, 1)
        np.testing.assert_array_equal(xb[:, 0], yb)
        seen.extend(yb.tolist())
    per_epoch = n // batch * batch
    for e in range(epochs):
        chunk = seen[e * per_epoch:(e + 1) * per_epoch]
        assert len(set(chunk)) == per_epoch  # no repeats within an epoch
    again = [b[1] for b in data.iterate_minibatches(x, y, batch, seed=2, num_epochs=epochs)]
    assert all(np.array_equal(a[1], b) for a, b in zip(batches, again, strict=True))
    full = data.minibatch_indices(n, batch, seed=2, drop_remainder=False)
    assert sorted(np.concatenate(full).tolist()) == list(range(n))


def test_minibatch_errors():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        data.minibatch_indices(5, 0, seed=0)
    with pytest.raises(ValueError, match="batch_size 6 exceeds the 5 samples"):
        data.minibatch_indices(5, 6, seed=0)
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        next(data.iterate_minibatches(np.zeros((3, 1)), np.zeros(2), 1, seed=0))


# --------------------------------------------------------------------- tau-sharp ratio


@pytest.mark.parametrize("m", [1, 7, 100])
def test_tau_sharp_ratio_1d(seed, m):
    costs = np.random.default_rng(seed).exponential(size=m)
    taus = [0.01, 0.1, 0.5, 1.0]
    out = common.tau_sharp_ratio(costs, taus)
    for tau in taus:
        k = max(1, math.ceil(tau * m))
        window = [costs[i] for i in range(m - k, m)]  # the last tau*M iterations
        mean = sum(window) / k
        std = math.sqrt(sum((c - mean) ** 2 for c in window) / k)
        assert out[tau]["window"] == k
        assert out[tau]["mean"] == pytest.approx(mean, rel=1e-12)
        assert out[tau]["std"] == pytest.approx(std, rel=1e-9, abs=1e-12)


def test_tau_sharp_ratio_runs(seed):
    costs = np.random.default_rng(seed).normal(size=(4, 30))
    out = common.tau_sharp_ratio(costs, [0.2])
    per_run = [row[-6:].mean() for row in costs]
    assert out[0.2]["window"] == 6
    np.testing.assert_allclose(out[0.2]["per_run"], per_run, rtol=1e-12)
    assert out[0.2]["mean"] == pytest.approx(np.mean(per_run))
    assert out[0.2]["std"] == pytest.approx(np.std(per_run))


def test_tau_sharp_ratio_errors():
    with pytest.raises(ValueError, match=r"every tau must be in \(0, 1\], got 0"):
        common.tau_sharp_ratio([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="costs must have shape"):
        common.tau_sharp_ratio(np.zeros((2, 2, 2)), [0.5])


# ------------------------------------------------------------------------ common helpers


def test_parser_and_json(tmp_path):
    parser = common.make_parser("x")
    args = parser.parse_args([])
    assert args.full is False and args.out == "results" and args.seed == 0
    args = parser.parse_args(["--full", "--seed", "3", "--out", str(tmp_path),
                              "--data-dir", "/d"])
    assert args.full and args.seed == 3 and args.data_dir == "/d"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quick", "--full"])
    # A quick run on the digits refuses --data-dir instead of ignoring it; counts are positive.
    quick = parser.parse_args(["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        common.check_data_dir(parser, quick, reads_idx=False)
    common.check_data_dir(parser, quick, reads_idx=True)
    # A directory that does not exist is refused where it would be read.
    with pytest.raises(SystemExit):
        common.check_data_dir(parser, parser.parse_args(["--data-dir", "/d"]), reads_idx=True)
    with pytest.raises(SystemExit):
        common.make_parser("x", data_dir=False).parse_args(["--data-dir", "/d"])
    assert common.positive_int("3") == 3
    with pytest.raises(Exception, match="must be a positive integer, got 0"):
        common.positive_int("0")
    path = common.write_json(tmp_path / "sub" / "r.json",
                             {"a": np.array([1.0, np.nan, np.inf]), "b": np.float32(0.123456789)},
                             config={"t": (1, 2)}, digits=4)
    import json

    got = json.loads(path.read_text())
    assert got["a"] == [1.0, None, None]
    assert got["b"] == 0.1235
    assert got["config"] == {"t": [1, 2]}
    assert "jax" in got["environment"]
