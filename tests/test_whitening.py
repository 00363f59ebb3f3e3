"""Tests of the feature-whitening map of eq. (28), checked against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfim_jax._src.whitening import apply_whitening, whitening_map


def _data(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated data with constant and duplicated columns; returns (x, singular flags)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * rng.uniform(0.1, 3.0, size=d)
    x = rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 5
    x[:, 1] = 0.37  # a constant "pixel"
    x[:, -1] = x[:, 0]  # a duplicated column
    x[:, 2] = 2.0 * x[:, 3] - x[:, 4]  # a linear combination
    return x


def _numpy_projector(x: np.ndarray) -> np.ndarray:
    """Orthogonal projector onto the range of the covariance (its non-singular subspace)."""
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    return cov @ np.linalg.pinv(cov, rcond=1e-10, hermitian=True)


@pytest.mark.parametrize("n,d", [(50, 6), (200, 11), (30, 40)])
def test_zca_whitened_covariance_is_projector(seed, n, d):
    x = _data(seed, n, d)
    big_a, a = whitening_map(jnp.asarray(x))
    z = np.asarray(apply_whitening(jnp.asarray(x), big_a, a))
    assert np.all(np.isfinite(np.asarray(big_a))) and np.all(np.isfinite(z))
    np.testing.assert_allclose(np.asarray(a), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    proj = _numpy_projector(x)
    # Rank: d - 3 singular directions, or fewer when n - 1 < d - 3.
    assert round(np.trace(proj)) == min(d - 3, n - 1)
    np.testing.assert_allclose(z.T @ z / n, proj, atol=1e-8)
    # ZCA: A is symmetric and annihilates the singular subspace (e.g. the constant pixel).
    np.testing.assert_allclose(np.asarray(big_a), np.asarray(big_a).T, atol=1e-10)
    np.testing.assert_allclose(np.asarray(big_a) @ (np.eye(d) - proj), 0.0, atol=1e-7)
    np.testing.assert_allclose(z[:, 1], 0.0, atol=1e-9)


@pytest.mark.parametrize("n,d", [(60, 7), (25, 30)])
def test_pca_whitened_covariance_is_identity_on_kept_axes(seed, n, d):
    x = _data(seed, n, d)
    big_a, a = whitening_map(jnp.asarray(x), method="pca")
    z = np.asarray(apply_whitening(jnp.asarray(x), big_a, a))
    rank = min(d - 3, n - 1)
    expected = np.diag((np.arange(d) < rank).astype(float))  # largest variance first
    np.testing.assert_allclose(z.T @ z / n, expected, atol=1e-8)
    # The kept rows span the same subspace as numpy's non-singular eigenvectors.
    rows = np.asarray(big_a)[:rank]
    proj = _numpy_projector(x)
    np.testing.assert_allclose(rows @ proj, rows, atol=1e-8)


def test_matches_numpy_inverse_sqrt_on_full_rank_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(100, 5)) @ rng.normal(size=(5, 5))
    big_a, _ = whitening_map(jnp.asarray(x))
    xc = x - x.mean(0)
    lam, v = np.linalg.eigh(xc.T @ xc / len(x))
    np.testing.assert_allclose(np.asarray(big_a), (v / np.sqrt(lam)) @ v.T, rtol=1e-8)


def test_eps_regularises_eigenvalues():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)) * np.array([1.0, 2.0, 0.5, 3.0])
    eps = 0.3
    big_a, a = whitening_map(jnp.asarray(x), eps=eps)
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    lam, v = np.linalg.eigh(cov)
    np.testing.assert_allclose(np.asarray(big_a), (v / np.sqrt(lam + eps)) @ v.T, rtol=1e-8)


def test_rtol_drops_small_but_nonzero_directions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)) * np.array([1.0, 1.0, 1e-4])
    big_a, a = whitening_map(jnp.asarray(x), rtol=1e-6)
    z = np.asarray(apply_whitening(jnp.asarray(x), big_a, a))
    cov = z.T @ z / len(z)
    # The third direction (variance ~1e-8 relative) is treated as singular.
    assert abs(np.trace(cov) - 2.0) < 1e-8
    np.testing.assert_allclose(z[:, 2], 0.0, atol=1e-3)


def test_constant_data_maps_to_zero():
    x = jnp.full((20, 4), 0.1)
    big_a, a = whitening_map(x)
    np.testing.assert_array_equal(np.asarray(big_a), 0.0)
    np.testing.assert_allclose(np.asarray(a), 0.1)
    assert np.all(np.asarray(apply_whitening(x, big_a, a)) == 0.0)


def test_jit_and_float32():
    rng = np.random.default_rng(2)
    x = _data(2, 64, 8).astype(np.float32)
    eager = whitening_map(jnp.asarray(x))
    jitted = jax.jit(functools.partial(whitening_map, method="zca"))(jnp.asarray(x))
    assert jitted[0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(eager[0]), rtol=1e-4, atol=1e-4)
    z = np.asarray(jax.jit(apply_whitening)(jnp.asarray(x), *jitted), dtype=np.float64)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z.T @ z / len(z), _numpy_projector(x.astype(np.float64)),
                               atol=2e-3)
    del rng


def test_integer_input_and_leading_axes():
    x = np.arange(24, dtype=np.int32).reshape(2, 4, 3) ** 2 % 7
    big_a, a = whitening_map(jnp.asarray(x))
    flat = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(np.asarray(a), flat.mean(0), rtol=1e-6)
    z = np.asarray(apply_whitening(jnp.asarray(x), big_a, a))
    assert z.shape == (2, 4, 3)


def test_errors():
    with pytest.raises(ValueError, match="expected a batch of shape"):
        whitening_map(jnp.ones(5))
    with pytest.raises(ValueError, match="method must be 'zca' or 'pca'"):
        whitening_map(jnp.ones((5, 2)), method="cholesky")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        whitening_map(jnp.ones((5, 2)), eps=-1.0)
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        whitening_map(jnp.ones((5, 2)), rtol=-1.0)
    with pytest.raises(ValueError, match="expected x \\(..., d\\), A \\(k, d\\)"):
        apply_whitening(jnp.ones((5, 3)), jnp.eye(2), jnp.zeros(2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused_by_name(bad):
    """One NaN or inf made the whole map NaN without a word."""
    x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype(np.float32)
    x[1, 2, 1] = bad  # leading axes flatten: sample 1 * 6 + 2 = 8
    x[1, 4, 0] = bad
    with pytest.raises(ValueError, match=r"whitening_map: x \(samples x features \(12, 3\), as "
                                         r"float32\) has 2 non-finite entries \(NaN or inf\), "
                                         r"the first at sample 8, feature 1"):
        whitening_map(jnp.asarray(x))
    # under jit it cannot raise: documented, the map is non-finite
    big_a, _ = jax.jit(whitening_map)(jnp.asarray(x))
    assert not np.all(np.isfinite(np.asarray(big_a)))


@pytest.mark.parametrize("shape", [(96, 8), (97, 8), (3, 40, 8), (8,)])
def test_apply_whitening_in_row_chunks_matches_numpy(shape, monkeypatch):
    """The chunked path (lax.map over row chunks; a remainder when the row count has no
    divisor in range, as 97 has not) gives (x - a) @ A.T, whatever the leading axes."""
    from rfim_jax._src import whitening as whitening_module

    monkeypatch.setattr(whitening_module, "APPLY_CHUNK_ELEMENTS", 8 * 8)  # 8 rows per chunk
    rng = np.random.default_rng(len(shape) + shape[0])
    x, big_a, a = rng.normal(size=shape), rng.normal(size=(5, 8)), rng.normal(size=8)
    got = jax.jit(apply_whitening)(jnp.asarray(x), jnp.asarray(big_a), jnp.asarray(a))
    want = (x - a) @ big_a.T
    assert got.shape == shape[:-1] + (5,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
    assert whitening_module._row_chunk(97, 8) == 8  # no divisor of 97 in [2, 8]
    assert whitening_module._row_chunk(96, 8) == 8 and whitening_module._row_chunk(90, 8) == 6


def test_a_large_offset_does_not_silence_the_other_features():
    """One feature at 1e4 made the rounding floor (then global, max|x|) cut a well-resolved
    feature of variance 1e-4 to 0; data at 1e6 + N(0, 1) in float32 gave A = 0."""
    rng = np.random.default_rng(0)
    cases = [
        np.stack([1e4 + rng.standard_normal(1000), 0.01 * rng.standard_normal(1000)], 1),
        1e6 + rng.standard_normal((200, 5)),
    ]
    for x in cases:
        x = x.astype(np.float32)
        big_a, a = whitening_map(jnp.asarray(x))
        # Independently, in float64 from the same float32 data: ZCA = C^(-1/2).
        x64 = x.astype(np.float64)
        c = np.cov(x64, rowvar=False, bias=True)
        lam, v = np.linalg.eigh(c)
        want = v @ np.diag(lam ** -0.5) @ v.T
        np.testing.assert_allclose(np.asarray(big_a), want, rtol=2e-3, atol=1e-6 * np.abs(
            want).max())
        np.testing.assert_allclose(np.asarray(a), x64.mean(0), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e18, 1e-19])
def test_whitening_extreme_scales_in_float32(scale):
    """At 1e18 the float32 covariance overflowed and A was all NaN; at 1e-19 it went
    subnormal and the whitened variances came out 0.8-0.9.  Reference: numpy in float64."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 5)) @ rng.normal(size=(5, 5)) + 3.0) * scale
    big_a, a = whitening_map(jnp.asarray(x, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(big_a)))
    z = (x - np.asarray(a, np.float64)) @ np.asarray(big_a, np.float64).T
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(5), atol=2e-3)
    # Damped at the tiny scale: eps dominates, A ~ eps^-1/2 I.
    if scale < 1:
        damped, _ = whitening_map(jnp.asarray(x, jnp.float32), eps=1e-2)
        np.testing.assert_allclose(np.asarray(damped), 10.0 * np.eye(5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [float, np.float32, jnp.float32])
def test_negative_eps_and_rtol_are_refused_whatever_their_number_type(make):
    """A numpy or jax scalar once slipped past a Python-number check and gave an all-NaN A."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(20, 4)), jnp.float32)
    with pytest.raises(ValueError, match=r"whitening_map: eps must be >= 0, got eps=-1"):
        whitening_map(x, eps=make(-1.0))
    with pytest.raises(ValueError, match=r"whitening_map: rtol must be >= 0, got rtol=-0.5"):
        whitening_map(x, rtol=make(-0.5))


def test_zero_features_and_complex_inputs_are_refused():
    with pytest.raises(ValueError, match=r"whitening_map: x has no features \(shape \(5, 0\)\)"):
        whitening_map(jnp.ones((5, 0)))
    big_a, a = whitening_map(jnp.asarray(np.random.default_rng(1).normal(size=(10, 3))))
    with pytest.raises(TypeError, match=r"apply_whitening: x: complex dtype complex64"):
        apply_whitening(jnp.ones((4, 3), jnp.complex64), big_a, a)
