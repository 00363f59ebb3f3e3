"""Tests for rfim_jax._src.dtypes: the stochastic rounding of narrow state stores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfim_jax._src import dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_is_unbiased_and_lands_on_a_neighbour(dtype):
    nmant = jnp.finfo(dtype).nmant
    # Values between representable neighbours, at several binades and both signs.
    x = np.array([1.0025, -1.0025, 3.3, 0.0123, -517.7, 1.0 + 0.9 * 2.0 ** -nmant], np.float32)
    draws = jax.vmap(lambda k: dtypes.stochastic_round(jnp.asarray(x), dtype, k))(
        jax.random.split(jax.random.key(1), 20000))
    assert draws.dtype == jnp.dtype(dtype)
    got = np.asarray(draws.astype(jnp.float32), np.float64)
    # Independently: the two neighbours of each x in the narrow dtype, by numpy.
    for j, v in enumerate(x.astype(np.float64)):
        values = np.unique(got[:, j])
        # Independently: the spacing of the narrow dtype in v's binade, 2^(e - nmant).
        spacing = 2.0 ** (np.floor(np.log2(abs(v))) - nmant)
        assert len(values) == 2, values
        np.testing.assert_array_equal(values, np.floor(v / spacing) * spacing + [0, spacing])
        p = (v - values[0]) / (values[1] - values[0])
        mean = got[:, j].mean()
        # Unbiased: the mean is x within five standard errors of a Bernoulli(p) draw.
        se = (values[1] - values[0]) * np.sqrt(p * (1 - p) / got.shape[0])
        assert abs(mean - v) < 5 * se, (v, mean, se)


def test_stochastic_round_keeps_exact_values_and_specials():
    x = jnp.asarray([1.0, -2.5, 0.0, -0.0, 1.0078125, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    for seed in range(5):
        out = dtypes.stochastic_round(x, jnp.bfloat16, jax.random.key(seed)).astype(jnp.float32)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_stochastic_round_saturates_finite_values_beyond_the_range():
    x = jnp.asarray([1e5, -7e4, 65504.0], jnp.float32)
    out = dtypes.stochastic_round(x, jnp.float16, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out, np.float32), [65504.0, -65504.0, 65504.0])


def test_narrower_than_float32():
    assert dtypes.narrower_than_float32(jnp.bfloat16)
    assert dtypes.narrower_than_float32(jnp.float16)
    assert not dtypes.narrower_than_float32(jnp.float32)
    assert not dtypes.narrower_than_float32(jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("up", [True, False])
def test_adjacent_is_the_next_value_for_every_finite_bit_pattern(dtype, up):
    """The neighbours come from the bit pattern, not ``nextafter`` (with which stochastic
    rounding behaved as rounding to nearest on a GPU; see dtypes.adjacent).  Checked against
    every finite value of the dtype, sorted."""
    v = np.arange(2**16, dtype=np.uint16).view(jnp.dtype(dtype))
    v = v[np.isfinite(v.astype(np.float32))]
    got = np.asarray(dtypes.adjacent(jnp.asarray(v), up=up)).astype(np.float64)
    # Independently: the sorted distinct values (+0 and -0 are one), inf beyond the range.
    values = np.concatenate([[-np.inf], np.unique(v.astype(np.float64)), [np.inf]])
    vf = v.astype(np.float64)
    want = (values[np.searchsorted(values, vf, side="right")] if up
            else values[np.searchsorted(values, vf, side="left") - 1])
    np.testing.assert_array_equal(got, want)


def test_adjacent_float32_matches_numpy_nextafter():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(4000) * 10.0 ** rng.integers(-44, 38, 4000)).astype(np.float32)
    v = np.concatenate([v, np.float32([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0])])
    for up, target in ((True, np.inf), (False, -np.inf)):
        np.testing.assert_array_equal(np.asarray(dtypes.adjacent(jnp.asarray(v), up=up)),
                                      np.nextafter(v, np.float32(target)))
