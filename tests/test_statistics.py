"""The statistics kernels: grouped rows and row chunking against numpy loops."""

import numpy as np
import pytest

from rfim_jax._src import statistics as stats

TOL = dict(rtol=1e-10, atol=1e-12)


def _data(n=37, groups=3, per_group=2, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, groups, d)), rng.random(size=(n, groups * per_group))


def _np_blocks(x, w):
    """G_l = mean_i w_il x_{i, g(l)} x_{i, g(l)}^T by loops."""
    n, groups, d = x.shape
    m = w.shape[1]
    per = m // groups
    out = np.zeros((m, d, d))
    for l in range(m):
        for i in range(n):
            out[l] += w[i, l] * np.outer(x[i, l // per], x[i, l // per])
    return out / n


@pytest.mark.parametrize("budget", [None, 40, 1])
def test_moments_grouped_and_chunked(monkeypatch, budget):
    if budget is not None:  # force the lax.scan over row chunks (and a ragged last chunk)
        monkeypatch.setattr(stats, "ROW_BUDGET", budget)
    x, w = _data()
    blocks = _np_blocks(x, w)
    np.testing.assert_allclose(stats.second_moment(x, w), blocks, **TOL)
    np.testing.assert_allclose(stats.diagonal_moments(x, w),
                               np.stack([np.diag(b) for b in blocks]), **TOL)
    np.testing.assert_allclose(stats.weighted_traces(x, w),
                               np.array([np.trace(b) for b in blocks]), **TOL)
    flat = x[:, 0]
    np.testing.assert_allclose(stats.second_moment(flat), flat.T @ flat / len(flat), **TOL)
    np.testing.assert_allclose(stats.second_moment(flat, w[:, :2]),
                               _np_blocks(flat[:, None], w[:, :2]), **TOL)
    coeffs = np.einsum("nk,nl->nkl", w, w)
    dense = np.zeros((6 * 5, 6 * 5))
    for i in range(len(flat)):
        dense += np.kron(coeffs[i], np.outer(flat[i], flat[i]))
    np.testing.assert_allclose(stats.coupled_rfim(flat, coeffs), dense / len(flat), **TOL)


@pytest.mark.parametrize("groups,per_group,d",
                         [(1, 8, 9), (1, 2, 9), (3, 4, 6), (2, 1, 7), (4, 2, 5),
                          (1, 9, 8), (1, 2, 2), (1, 1, 1), (2, 3, 3)])
@pytest.mark.parametrize("neurons_first_rows", [None, 0])
def test_per_neuron_moments_both_paths(monkeypatch, groups, per_group, d, neurons_first_rows):
    """Through the triangle of x x^T (d < 2m) and the plain contraction (d >= 2m) alike, and
    on the triangle's two layouts (few rows: weights transposed; many rows: result
    transposed)."""
    if neurons_first_rows is not None:
        monkeypatch.setattr(stats, "NEURONS_FIRST_ROWS", neurons_first_rows)
    x, w = _data(n=23, groups=groups, per_group=per_group, d=d, seed=d)
    triangle = d < 2 * per_group
    assert stats._use_triangle(per_group, d) == triangle
    got = stats.second_moment(x if groups > 1 else x[:, 0], w)
    np.testing.assert_allclose(got, _np_blocks(x, w), **TOL)
    if triangle:  # one triangle, mirrored: exactly symmetric
        np.testing.assert_array_equal(got, np.swapaxes(got, 1, 2))


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8, 9, 64, 65])
def test_packed_order_holds_each_entry_once_and_unpacks(d):
    """The packed order names every unordered pair {a, b} exactly once, and unpacking a
    symmetric matrix's packed entries gives back the matrix, to the bit."""
    rows, cols = stats._packed_pairs(d)
    pairs = {(min(a, b), max(a, b)) for a, b in zip(rows.tolist(), cols.tolist(), strict=True)}
    assert len(rows) == d * (d + 1) // 2 == len(pairs)
    assert pairs == {(a, b) for a in range(d) for b in range(a, d)}
    rng = np.random.default_rng(d)
    a = rng.normal(size=(3, d, d))
    sym = a + np.swapaxes(a, 1, 2)
    np.testing.assert_array_equal(stats._unpack_symmetric(sym[:, rows, cols], d), sym)


@pytest.mark.parametrize("m,d", [(2, 3), (3, 5), (4, 1), (2, 9)])
@pytest.mark.parametrize("neurons_first_rows", [None, 0])
def test_coupled_rfim_against_kronecker_sum(monkeypatch, m, d, neurons_first_rows):
    """``coupled_rfim`` equals ``mean_i K_i kron x_i x_i^T`` summed by loops, for symmetric
    ``K_i`` of both signs (the softmax Fisher's off-diagonal entries are negative), whether its
    m (m + 1) / 2 pair blocks go through the triangle (d < m (m + 1)) or the plain contraction,
    on both layouts; and, through the triangle, the result is exactly symmetric."""
    if neurons_first_rows is not None:
        monkeypatch.setattr(stats, "NEURONS_FIRST_ROWS", neurons_first_rows)
    rng = np.random.default_rng(10 * m + d)
    x = rng.normal(size=(19, d))
    a = rng.normal(size=(19, m, m))
    coeffs = a + np.swapaxes(a, 1, 2)
    want = sum(np.kron(coeffs[i], np.outer(x[i], x[i])) for i in range(len(x))) / len(x)
    got = np.asarray(stats.coupled_rfim(x, coeffs))
    np.testing.assert_allclose(got, want, **TOL)
    if stats._use_triangle(m * (m + 1) // 2, d):
        np.testing.assert_array_equal(got, got.T)
