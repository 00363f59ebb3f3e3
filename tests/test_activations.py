"""Activations: f, f' and the Fisher coefficient nu against SPEC Sec. 3, written independently.

The reference formulas below are written out from the paper (eqs. 11-20, 41) in numpy, not taken
from the library.  nu is also checked against the definition (eq. 9) of a one-dimensional
response model with the pre-activation z as parameter: exact sums over y for the Bernoulli
models, Gauss-Hermite quadrature in y for the Gaussian ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import ACTIVATIONS

import rfim_jax
from rfim_jax import (
    ELU,
    GELU,
    GELUTanh,
    Linear,
    ReLU,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
    get_activation,
)


def _sigmoid(t):
    return 1.0 / (1.0 + jnp.exp(-t))


def _Phi(t):  # standard normal CDF
    return 0.5 * jax.scipy.special.erfc(-t / np.sqrt(2.0))


def _phi(t):  # standard normal density
    return jnp.exp(-0.5 * t**2) / np.sqrt(2.0 * np.pi)


_C, _A = np.sqrt(2.0 / np.pi), 0.044715  # constants of the tanh approximation of GELU


# (f, f', nu) written from the paper's formulas (jnp so that they can be differentiated).
def _reference(act):
    if isinstance(act, Tanh):
        return jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2, lambda z: 1 - jnp.tanh(z) ** 2
    if isinstance(act, Sigmoid):
        s = _sigmoid
        return s, lambda z: s(z) * (1 - s(z)), lambda z: s(z) * (1 - s(z))
    if isinstance(act, ReLU):
        om, io, sg = act.omega, act.iota, act.sigma
        if om > 0:
            def f(z):
                return om * jnp.log(jnp.exp(io * z / om) + jnp.exp(z / om))

            def df(z):
                return io + (1 - io) * _sigmoid((1 - io) * z / om)

            return f, df, lambda z: df(z) ** 2 / sg**2
        return (
            lambda z: jnp.maximum(z, io * z),
            lambda z: jnp.where(z > 0, 1.0, io),
            lambda z: jnp.where(z > 0, 1.0 / sg**2, io**2 / sg**2),
        )
    if isinstance(act, ELU):
        al, sg = act.alpha, act.sigma
        return (
            lambda z: jnp.where(z >= 0, z, al * (jnp.exp(jnp.minimum(z, 0)) - 1)),
            lambda z: jnp.where(z >= 0, 1.0, al * jnp.exp(jnp.minimum(z, 0))),
            lambda z: jnp.where(
                z >= 0, 1.0 / sg**2, al**2 * jnp.exp(2 * jnp.minimum(z, 0)) / sg**2
            ),
        )
    if isinstance(act, Linear):
        sg = act.sigma
        return lambda z: z, lambda z: jnp.ones_like(z), lambda z: jnp.full_like(z, 1 / sg**2)
    # SPEC Sec. 8: Gaussian responses, nu = f'(z)^2 / sigma^2.
    if isinstance(act, GELU):
        f, df = (lambda z: z * _Phi(z)), (lambda z: _Phi(z) + z * _phi(z))
    elif isinstance(act, GELUTanh):
        def f(z):
            return 0.5 * z * (1 + jnp.tanh(_C * (z + _A * z**3)))

        def df(z):
            t = jnp.tanh(_C * (z + _A * z**3))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t**2) * _C * (1 + 3 * _A * z**2)
    elif isinstance(act, SiLU):
        f, df = (lambda z: z * _sigmoid(z)), (lambda z: _sigmoid(z) * (1 + z * (1 - _sigmoid(z))))
    elif isinstance(act, Softplus):
        f, df = (lambda z: jnp.log1p(jnp.exp(z))), _sigmoid
    else:
        raise AssertionError(act)
    sg = act.sigma
    return f, df, lambda z: df(z) ** 2 / sg**2




def _z(seed, n=41):
    # Keep clear of 0 so the kinks of hard relu/elu are not sampled.
    z = np.random.default_rng(seed).normal(scale=3.0, size=n)
    return np.where(np.abs(z) < 1e-3, 0.5, z)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_f_df_nu_match_table(act, seed):
    z = _z(seed)
    f, df, nu = _reference(act)
    np.testing.assert_allclose(act.f(jnp.asarray(z)), f(z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(act.df(jnp.asarray(z)), df(z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(act.nu(jnp.asarray(z)), nu(z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(act(jnp.asarray(z)), f(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_df_is_grad_of_f(act, seed):
    z = jnp.asarray(_z(seed))
    grad = jax.vmap(jax.grad(act.f))(z)
    np.testing.assert_allclose(act.df(z), grad, rtol=1e-12, atol=1e-12)


def _score_fisher(act, z):
    """E_y[(d/dz ln p(y|z))^2] for one scalar z, by the definition (eq. 9)."""
    if act.response == "bernoulli":
        def logp(zz, y):
            return y * jax.nn.log_sigmoid(zz) + (1 - y) * jax.nn.log_sigmoid(-zz)

        ys, weights = jnp.array([0.0, 1.0]), None
    elif act.response == "bernoulli_pm1":
        def logp(zz, y):
            return jnp.log((1 + y * jnp.tanh(zz)) / 2)

        ys, weights = jnp.array([-1.0, 1.0]), None
    else:
        f = _reference(act)[0]
        mean = float(f(z))
        t, w = np.polynomial.hermite_e.hermegauss(5)
        ys, weights = jnp.asarray(mean + act.sigma * t), jnp.asarray(w / np.sqrt(2 * np.pi))

        def logp(zz, y):
            return -0.5 * ((y - f(zz)) / act.sigma) ** 2

    scores = jax.vmap(jax.grad(logp), in_axes=(None, 0))(z, ys)
    if weights is None:
        weights = jnp.exp(jax.vmap(logp, in_axes=(None, 0))(z, ys))
    return jnp.sum(weights * scores**2)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_nu_is_fisher_of_z(act, seed):
    for z in _z(seed, n=4):
        expected = _score_fisher(act, z)
        np.testing.assert_allclose(act.nu(jnp.asarray(z)), expected, rtol=1e-9, atol=1e-12)


def test_paper_default_relu_is_sigmoid_squared():
    z = jnp.linspace(-4, 4, 17)
    np.testing.assert_allclose(ReLU().nu(z), _sigmoid(z) ** 2, rtol=1e-12)


def test_z_zero_conventions():
    zero = jnp.zeros(())
    for iota, sigma in [(0.0, 1.0), (0.2, 0.5), (0.7, 3.0)]:
        act = ReLU(omega=0.0, iota=iota, sigma=sigma)
        np.testing.assert_allclose(act.nu(zero), iota**2 / sigma**2, rtol=1e-14, atol=0)
        np.testing.assert_allclose(act.df(zero), iota, rtol=1e-14, atol=0)
        np.testing.assert_allclose(act.f(zero), 0.0)
    for alpha, sigma in [(1.0, 1.0), (0.5, 2.0)]:
        act = ELU(alpha=alpha, sigma=sigma)
        np.testing.assert_allclose(act.nu(zero), 1.0 / sigma**2, rtol=1e-14)
        np.testing.assert_allclose(act.df(zero), 1.0, rtol=1e-14)


def test_smoothed_relu_tends_to_hard_relu():
    z = jnp.array([-2.0, -0.5, 0.5, 2.0])
    hard = ReLU(omega=0.0, iota=0.2)
    soft = ReLU(omega=1e-3, iota=0.2)
    np.testing.assert_allclose(soft.f(z), hard.f(z), atol=1e-6)
    np.testing.assert_allclose(soft.nu(z), hard.nu(z), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_large_inputs_stay_finite(dtype):
    """Up to the dtype's largest value, also for a sharp smoothed relu (z / omega used to
    overflow: ReLU(omega=1e-6).f(3.4e38) was inf)."""
    big = float(jnp.finfo(dtype).max)
    z = jnp.array([-big, -1e30, -800.0, -50.0, 50.0, 800.0, 1e30, big], dtype)
    for act in [*ACTIVATIONS, ReLU(omega=1e-6, iota=0.1), ReLU(omega=1e-30)]:
        for fn in (act.f, act.df, act.nu):
            assert bool(jnp.all(jnp.isfinite(fn(z)))), (act, fn, fn(z))


@pytest.mark.parametrize(
    "name, cls", [("tanh", Tanh), ("sigmoid", Sigmoid), ("relu", ReLU), ("elu", ELU),
                  ("linear", Linear), ("ReLU", ReLU), ("TANH", Tanh), ("gelu", GELU),
                  ("gelu_tanh", GELUTanh), ("silu", SiLU), ("softplus", Softplus),
                  ("GELU", GELU), ("SiLU", SiLU)]
)
def test_names_resolve_to_defaults(name, cls):
    act = get_activation(name)
    assert type(act) is cls
    assert act == cls()
    assert act.name == name.lower()


def test_defaults():
    assert (ReLU().omega, ReLU().iota, ReLU().sigma) == (1.0, 0.0, 1.0)
    assert (ELU().alpha, ELU().sigma) == (1.0, 1.0)
    assert Linear().sigma == 1.0
    for cls in (GELU, GELUTanh, SiLU, Softplus):
        assert cls().sigma == 1.0
    assert rfim_jax.ACTIVATION_NAMES == (
        "tanh", "sigmoid", "relu", "elu", "linear", "gelu", "gelu_tanh", "silu", "softplus"
    )


def test_responses():
    assert Tanh().response == "bernoulli_pm1"
    assert Sigmoid().response == "bernoulli"
    for act in (ReLU(), ELU(), Linear(), GELU(), GELUTanh(), SiLU(), Softplus()):
        assert act.response == "gaussian"


def test_objects_pass_through():
    act = ReLU(omega=0.3, iota=0.1, sigma=2.0)
    assert get_activation(act) is act


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"Unknown activation 'swish'; valid names are 'tanh', 'sigmoid', 'relu', 'elu', "
        r"'linear', 'gelu', 'gelu_tanh', 'silu', 'softplus'\.",
    ):
        get_activation("swish")


def test_wrong_type():
    with pytest.raises(TypeError, match=r"An activation must be a name .* got int: 3"):
        get_activation(3)


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: ReLU(omega=-0.1), r"ReLU: omega must be >= 0, got omega=-0.1"),
        (lambda: ReLU(iota=1.0), r"ReLU: iota must lie in \[0, 1\), got iota=1.0"),
        (lambda: ReLU(iota=-0.5), r"ReLU: iota must lie in \[0, 1\), got iota=-0.5"),
        (lambda: ReLU(sigma=0.0), r"ReLU: sigma must be > 0, got sigma=0.0"),
        (lambda: ELU(alpha=0.0), r"ELU: alpha must be > 0, got alpha=0.0"),
        (lambda: ELU(alpha=-1.0), r"ELU: alpha must be > 0, got alpha=-1.0"),
        (lambda: ELU(sigma=-1.0), r"ELU: sigma must be > 0, got sigma=-1.0"),
        (lambda: Linear(sigma=0.0), r"Linear: sigma must be > 0, got sigma=0.0"),
        (lambda: ReLU(omega=float("nan")), r"ReLU: omega must be >= 0, got omega=nan"),
        (lambda: GELU(sigma=0.0), r"GELU: sigma must be > 0, got sigma=0.0"),
        (lambda: GELUTanh(sigma=-2.0), r"GELUTanh: sigma must be > 0, got sigma=-2.0"),
        (lambda: SiLU(sigma=float("nan")), r"SiLU: sigma must be > 0, got sigma=nan"),
        (lambda: Softplus(sigma=0.0), r"Softplus: sigma must be > 0, got sigma=0.0"),
        # 1/sigma^2 outside float32: every nu inf (or 0), the metric useless without a word.
        (lambda: Linear(sigma=1e-30), r"Linear: sigma=1e-30 puts 1/sigma\^2 outside "
                                      r"float32's range"),
        (lambda: GELU(sigma=1e-20), r"GELU: sigma=1e-20 puts 1/sigma\^2 outside"),
        (lambda: ReLU(sigma=float("inf")), r"ReLU: sigma=inf puts 1/sigma\^2 outside"),
    ],
)
def test_invalid_parameters(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_sigma_at_the_float32_limits_keeps_nu_finite():
    z = jnp.array([-3.0, 0.5, 2.0], jnp.float32)
    for sigma in (1.1e-19, 1.8e19):
        nu = Linear(sigma=sigma).nu(z)
        assert np.all(np.isfinite(np.asarray(nu))) and np.all(np.asarray(nu) > 0), sigma


def test_hashable_and_static_under_jit():
    assert hash(ReLU(omega=0.5)) == hash(ReLU(omega=0.5))
    assert ReLU(omega=0.5) != ReLU(omega=0.6)
    assert len({ReLU(), ReLU(), ELU(), Tanh(), Tanh()}) == 3
    # Integer parameters are normalised to floats, so equal settings hash equally.
    assert ReLU(omega=1, sigma=2) == ReLU(omega=1.0, sigma=2.0)

    calls = []

    def nu(z, act):
        calls.append(act)
        return act.nu(z)

    jitted = jax.jit(nu, static_argnums=1)
    z = jnp.linspace(-1, 1, 5)
    np.testing.assert_allclose(jitted(z, ReLU(omega=0.5)), ReLU(omega=0.5).nu(z))
    jitted(z, ReLU(omega=0.5))  # same static arg: no retrace
    jitted(z, ReLU(omega=0.25))
    assert len(calls) == 2


def test_frozen():
    with pytest.raises(Exception, match="cannot assign"):
        ReLU().omega = 2.0


# ------------------------------------------- SPEC Sec. 8: gelu, gelu_tanh, silu, softplus

NEW_GAUSSIAN = [a for a in ACTIVATIONS if isinstance(a, (GELU, GELUTanh, SiLU, Softplus))]


def _independent_f(act):
    """The mean function from JAX's own implementations (or scipy.stats), not the library's."""
    if isinstance(act, GELU):
        return lambda z: z * jax.scipy.stats.norm.cdf(z)
    if isinstance(act, GELUTanh):
        return lambda z: jax.nn.gelu(z, approximate=True)
    if isinstance(act, SiLU):
        return jax.nn.silu
    if isinstance(act, Softplus):
        return jax.nn.softplus
    raise AssertionError(act)


def test_new_activations_are_covered():
    assert {type(a) for a in NEW_GAUSSIAN} == {GELU, GELUTanh, SiLU, Softplus}
    assert any(a.sigma != 1.0 for a in NEW_GAUSSIAN)


@pytest.mark.parametrize("act", NEW_GAUSSIAN, ids=repr)
def test_new_df_is_grad_of_independent_f(act, seed):
    f = _independent_f(act)
    z = jnp.asarray(np.concatenate([_z(seed), [0.0, -12.0, 12.0]]))
    # jax.nn.gelu(approximate=True) forms 1 + tanh(u) and 1 - tanh(u)^2, which cancel for z << 0
    # (absolute error ~1e-14 near z = -7); the library's s(2u) s(-2u) form does not.
    atol = 1e-13 if isinstance(act, GELUTanh) else 1e-14
    np.testing.assert_allclose(act.f(z), f(z), rtol=1e-12, atol=atol)
    np.testing.assert_allclose(act.df(z), jax.vmap(jax.grad(f))(z), rtol=1e-12, atol=atol)
    if isinstance(act, GELU):  # the erf form of jax.nn.gelu, too
        np.testing.assert_allclose(act.f(z), jax.nn.gelu(z, approximate=False),
                                   rtol=1e-12, atol=1e-14)


def _gaussian_score_fisher(f, sigma, z, order=8):
    """E_{y ~ N(f(z), sigma^2)}[(d/dz ln p(y|z))^2] (eq. 9), by autodiff of the full Gaussian
    log-density and Gauss-Hermite quadrature over y (exact: the score is affine in y)."""
    t, w = np.polynomial.hermite_e.hermegauss(order)
    ys = jnp.asarray(float(f(z)) + sigma * t)

    def logp(zz, y):
        return jax.scipy.stats.norm.logpdf(y, loc=f(zz), scale=sigma)

    scores = jax.vmap(jax.grad(logp), in_axes=(None, 0))(jnp.asarray(z), ys)
    return jnp.sum(jnp.asarray(w / np.sqrt(2 * np.pi)) * scores**2)


@pytest.mark.parametrize("act", NEW_GAUSSIAN, ids=repr)
def test_new_nu_is_expected_squared_score(act, seed):
    f = _independent_f(act)
    for z in np.concatenate([_z(seed, n=6), [0.0, -4.0, 4.0]]):
        expected = _gaussian_score_fisher(f, act.sigma, z)
        np.testing.assert_allclose(act.nu(jnp.asarray(z)), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("act", NEW_GAUSSIAN, ids=repr)
def test_new_activations_stable_for_large_inputs(act, dtype):
    z = jnp.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=dtype)
    f, df, nu = act.f(z), act.df(z), act.nu(z)
    grad = jax.vmap(jax.grad(act.f))(z)
    for v in (f, df, nu, grad):
        assert v.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(v))), (act, v)
    f, df, nu, grad = (np.asarray(v, dtype=np.float64) for v in (f, df, nu, grad))
    # Saturated tails: f -> z and f' -> 1 on the right; f -> 0 and f' -> 0 on the left.
    np.testing.assert_allclose(f[[0, 4]], [0.0, 1e4], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(df[[0, 3, 4]], [0.0, 1.0, 1.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(grad, df, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(nu, df**2 / act.sigma**2, rtol=1e-6, atol=1e-30)
    # Every one of them has f'(0) = 1/2.
    np.testing.assert_allclose(df[2], 0.5, rtol=1e-7)
    if not isinstance(act, Softplus):  # the others dip below zero on the left
        assert bool(jnp.all(df[:2] <= 0.0))


@pytest.mark.parametrize("act", NEW_GAUSSIAN, ids=repr)
def test_new_activations_float32_match_float64(act):
    z = np.linspace(-8.0, 8.0, 65)
    for fn in (act.f, act.df, act.nu):
        lo, hi = fn(jnp.asarray(z, jnp.float32)), fn(jnp.asarray(z, jnp.float64))
        assert lo.dtype == jnp.float32
        np.testing.assert_allclose(lo, hi, rtol=1e-4, atol=1e-30)


def test_softplus_is_smoothed_relu_with_omega_one():
    z = jnp.linspace(-30.0, 30.0, 61)
    for sigma in (1.0, 0.3):
        soft, relu = Softplus(sigma=sigma), ReLU(omega=1.0, iota=0.0, sigma=sigma)
        for a, b in ((soft.f, relu.f), (soft.df, relu.df), (soft.nu, relu.nu)):
            np.testing.assert_allclose(a(z), b(z), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("omega,iota", [(1.0, 0.0), (0.5, 0.2), (2.0, 0.7)])
def test_smoothed_relu_autodiff_matches_its_derivative_at_zero(omega, iota):
    """An activation object is callable, so models differentiate its f: at z = 0 autodiff
    of the overflow-safe form gave iota instead of (1 + iota)/2.  The reference is the
    definition omega logaddexp(iota z / omega, z / omega) (eq. 41), differentiated by JAX."""
    act = rfim_jax.ReLU(omega=omega, iota=iota)

    def definition(z):
        return omega * jnp.logaddexp(iota * z / omega, z / omega)

    zs = jnp.array([0.0, -0.0, 1e-30, -2.5, 3.0])
    want = jax.vmap(jax.grad(definition))(zs)
    np.testing.assert_allclose(jax.vmap(jax.grad(act.f))(zs), want, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(jax.grad(act))(zs), want, rtol=1e-12)
    np.testing.assert_allclose(act.df(zs), want, rtol=1e-12)
    # The second derivative (of df) is the definition's too.
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(act.f)))(zs),
                               jax.vmap(jax.grad(jax.grad(definition)))(zs), rtol=1e-10)


def test_sigma_may_be_traced():
    """linear_rfim(p, x, s) and ReLU(sigma=s) raised a raw ConcretizationTypeError under jit
    (full_fisher and fisher_rao_norm already took a traced sigma).  The reference is eq. (22)
    / (18) computed by numpy: the metric scales as 1/sigma^2."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    p = {"kernel": jnp.asarray(rng.normal(size=(3, 4))), "bias": jnp.zeros(4)}
    xa = np.concatenate([x, np.ones((6, 1))], 1)
    for s in (0.5, 2.0):
        got = jax.jit(lambda s: rfim_jax.linear_rfim(p, jnp.asarray(x), s).to_dense())(s)
        np.testing.assert_allclose(got[:4, :4], xa.T @ xa / 6 / s**2, rtol=1e-10)
        got = jax.jit(lambda s: rfim_jax.nonlinear_rfim(
            p, jnp.asarray(x), rfim_jax.ReLU(sigma=s)).to_dense())(s)
        z = x @ np.asarray(p["kernel"])
        nu = (1.0 / (1.0 + np.exp(-z[:, 0]))) ** 2 / s**2
        np.testing.assert_allclose(got[:4, :4], (xa * nu[:, None]).T @ xa / 6, rtol=1e-10)
    with pytest.raises(ValueError, match=r"sigma must be > 0"):
        rfim_jax.ReLU(sigma=0.0)
