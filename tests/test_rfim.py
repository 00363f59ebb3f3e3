"""Every RFIM constructor against the definition (eq. 9), computed independently by autodiff.

    g^y(theta | x) = mean_i E_{p(y | theta, x_i)} [ s_i(y) s_i(y)^T ],
    s_i(y) = d/dtheta ln p(y | theta, x_i),

The log-likelihoods below are written out here from the response models of SPEC Sec. 3 (with
our own mean functions, not the library's ``Activation.f``), differentiated with ``jax.grad``
with respect to the neuron-major flat parameter vector ``theta = concat_l [kernel[:, l],
bias[l]]`` (built with explicit loops), and the expectation over y is exact:

* Bernoulli / tanh (y in {-1, 1}) / categorical: a sum over every outcome, weighted by its
  probability exp(ln p);
* Gaussian: Gauss-Hermite quadrature in y (``hermegauss``), exact because the score is affine
  in y; and, separately, ``J^T J / sigma^2`` with J the Jacobian of the mean.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import ACTIVATIONS

from rfim_jax import (
    ELU,
    GELU,
    BlockDiagonalMetric,
    DenseMetric,
    DiagonalMetric,
    EigenDiagonalMetric,
    GELUTanh,
    Linear,
    ReLU,
    SharedBlockMetric,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
    layer_rfim_from_activations,
    linear_rfim,
    neuron_rfim,
    nonlinear_rfim,
    softmax_rfim,
    two_layer_rfim,
)
from rfim_jax._src.rfim import augment

# ------------------------------------------------------------------ independent definitions


def _sigmoid(t):
    return 1.0 / (1.0 + jnp.exp(-t))


def _spec(act):
    """(family, parameters) of an activation.  The parameters are an array so that they can be
    traced: the definitions compile once per family and are vmapped over its settings."""
    if act == "softmax":
        return "softmax", jnp.zeros(0)
    if isinstance(act, (Sigmoid, Tanh)):
        return act.name, jnp.zeros(0)
    if isinstance(act, ReLU):
        family = "relu" if act.omega > 0 else "hard_relu"
        return family, jnp.array([act.omega, act.iota, act.sigma])
    if isinstance(act, ELU):
        return "elu", jnp.array([act.alpha, act.sigma])
    if isinstance(act, Linear):
        return "linear", jnp.array([act.sigma])
    if isinstance(act, (GELU, GELUTanh, SiLU, Softplus)):
        return act.name, jnp.array([act.sigma])
    raise AssertionError(act)


def _mean_fn(family, p):
    """The mean of the response, from the paper's formulas (eqs. 11-19)."""
    if family == "sigmoid":
        return _sigmoid
    if family == "tanh":
        return jnp.tanh
    if family == "relu":  # relu_omega(t) = omega ln(exp(iota t / omega) + exp(t / omega))
        om, io = p[0], p[1]
        return lambda t: om * jnp.log(jnp.exp(io * t / om) + jnp.exp(t / om))
    if family == "hard_relu":
        return lambda t: jnp.maximum(t, p[1] * t)
    if family == "elu":
        return lambda t: jnp.where(t >= 0, t, p[0] * (jnp.exp(jnp.minimum(t, 0.0)) - 1.0))
    if family == "linear":
        return lambda t: t
    # SPEC Sec. 8.
    if family == "gelu":  # t Phi(t)
        return lambda t: 0.5 * t * jax.scipy.special.erfc(-t / np.sqrt(2.0))
    if family == "gelu_tanh":
        return lambda t: 0.5 * t * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (t + 0.044715 * t**3)))
    if family == "silu":
        return lambda t: t * _sigmoid(t)
    if family == "softplus":
        return lambda t: jnp.log1p(jnp.exp(t))
    raise AssertionError(family)


def _response(family):
    return {"softmax": "categorical", "sigmoid": "bernoulli", "tanh": "pm1"}.get(
        family, "gaussian"
    )


def _log_lik(family, p, u, y):
    """ln p(y | u) summed over the k independent outputs (or one categorical).  Constants are
    kept for the discrete models, whose probabilities weight the outcomes."""
    kind = _response(family)
    if kind == "categorical":  # y one-hot
        return jnp.sum(y * (u - jnp.log(jnp.sum(jnp.exp(u)))))
    if kind == "bernoulli":
        s = _sigmoid(u)
        return jnp.sum(y * jnp.log(s) + (1.0 - y) * jnp.log(1.0 - s))
    if kind == "pm1":
        return jnp.sum(jnp.log((1.0 + y * jnp.tanh(u)) / 2.0))
    return jnp.sum(-0.5 * ((y - _mean_fn(family, p)(u)) / p[-1]) ** 2)  # p[-1] is sigma


def _outcomes(family, p, u0):
    """Outcomes y (n, Q, k) and weights (n, Q), or None for w = p(y), for outputs u0 (n, k)."""
    n, k = u0.shape
    kind = _response(family)
    if kind == "categorical":
        return jnp.broadcast_to(np.eye(k), (n, k, k)), None
    if kind in ("bernoulli", "pm1"):
        vals = (0.0, 1.0) if kind == "bernoulli" else (-1.0, 1.0)
        ys = np.array(list(itertools.product(vals, repeat=k)))
        return jnp.broadcast_to(ys, (n,) + ys.shape), None
    t, w = np.polynomial.hermite_e.hermegauss(3)
    grid = np.array(list(itertools.product(range(3), repeat=k)))  # (Q, k)
    mean = _mean_fn(family, p)(u0)  # (n, k)
    ys = mean[:, None, :] + p[-1] * jnp.asarray(t[grid])[None]
    ws = np.prod(w[grid] / np.sqrt(2 * np.pi), axis=-1)
    return ys, jnp.broadcast_to(ws, (n, len(ws)))


def _definition(log_lik, theta, xs, ys, ws):
    """mean_i sum_y w_iy s s^T with s = d/dtheta log_lik(theta, x_i, y) (eq. 9)."""
    score = jax.vmap(jax.vmap(jax.grad(log_lik), (None, None, 0)), (None, 0, 0))(theta, xs, ys)
    if ws is None:
        ws = jnp.exp(jax.vmap(jax.vmap(log_lik, (None, None, 0)), (None, 0, 0))(theta, xs, ys))
        # The outcomes must exhaust the distribution; NaN poisons the result otherwise.
        ws = ws / jnp.where(jnp.abs(jnp.sum(ws, axis=1, keepdims=True) - 1) < 1e-12, 1.0, jnp.nan)
    return jnp.einsum("iq,iqa,iqb->ab", ws, score, score) / xs.shape[0]


def _flat(params):
    """theta = concat_l [kernel[:, l], bias[l]] by explicit loops (SPEC Sec. 2)."""
    kernel = params["kernel"]
    parts = []
    for l in range(kernel.shape[1]):
        parts.append(kernel[:, l])
        if "bias" in params:
            parts.append(params["bias"][l : l + 1])
    return jnp.concatenate(parts)


def _preacts(theta, x, d_in, m, has_bias):
    """z_l = w~_l^T x~ with w~_l = theta[l d : (l + 1) d], the neuron-major layout."""
    w = theta.reshape(m, d_in + int(has_bias))  # row l is w~_l
    z = w[:, :d_in] @ x
    return z + w[:, d_in] if has_bias else z


def _layer_definition(family, p, params, x):
    """The RFIM of a layer with m independent stochastic outputs y_l ~ p(y | f(z_l))."""
    d_in, m = params["kernel"].shape
    has_bias = "bias" in params
    theta = _flat(params)

    def log_lik(th, xi, y):
        return _log_lik(family, p, _preacts(th, xi, d_in, m, has_bias), y)

    z0 = jax.vmap(lambda xi: _preacts(theta, xi, d_in, m, has_bias))(x)
    ys, ws = _outcomes(family, p, z0)
    return _definition(log_lik, theta, x, ys, ws)


def _gaussian_jtj(family, p, params, x):
    """mean_i J_i^T J_i / sigma^2, J_i = d f(z(theta, x_i)) / dtheta, for a Gaussian layer."""
    d_in, m = params["kernel"].shape
    has_bias = "bias" in params
    theta = _flat(params)
    f = _mean_fn(family, p)
    jac = jax.vmap(jax.jacrev(lambda th, xi: f(_preacts(th, xi, d_in, m, has_bias))),
                   (None, 0))(theta, x)
    return jnp.einsum("ika,ikb->ab", jac, jac) / (x.shape[0] * p[-1] ** 2)


def _two_layer_definition(family, p, out_family, p_out, params, params_out, x):
    """RFIM of W for h = f(W~^T x~), y ~ p(y | g(C~^T h~)); x and C are the reference."""
    d_in, m = params["kernel"].shape
    has_bias = "bias" in params
    theta = _flat(params)
    f = _mean_fn(family, p)

    def logits(th, xi):
        h = f(_preacts(th, xi, d_in, m, has_bias))
        u = h @ params_out["kernel"]
        return u + params_out["bias"] if "bias" in params_out else u

    def log_lik(th, xi, y):
        return _log_lik(out_family, p_out, logits(th, xi), y)

    u0 = jax.vmap(lambda xi: logits(theta, xi))(x)
    ys, ws = _outcomes(out_family, p_out, u0)
    return _definition(log_lik, theta, x, ys, ws)


def _by_family(fn, keyed_acts):
    """``{key: fn(families, params)}``, vmapping fn over the parameters of each family group.

    ``keyed_acts`` maps a key to a tuple of activations; their families must match within a
    group, and the group's parameters are stacked and vmapped over.
    """
    groups = {}
    for key, acts in keyed_acts.items():
        specs = [_spec(a) for a in acts]
        fams = tuple(f for f, _ in specs)
        groups.setdefault(fams, []).append((key, [q for _, q in specs]))
    out = {}
    for fams, members in groups.items():
        stacked = [jnp.stack([m[1][j] for m in members]) for j in range(len(fams))]
        res = jax.vmap(lambda *ps, fams=fams: fn(fams, ps))(*stacked)
        for i, (key, _) in enumerate(members):
            out[key] = res[i]
    return out


# ------------------------------------------------------------------------------ fixtures


def _layer(rng, d_in, m, has_bias, scale=1.0):
    params = {"kernel": jnp.asarray(rng.normal(size=(d_in, m)) * scale / np.sqrt(d_in))}
    if has_bias:
        params["bias"] = jnp.asarray(rng.normal(size=(m,)) * 0.5 * scale)
    return params


def _data(n, d_in, m, seed, has_bias, scale=1.5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d_in)))
    return _layer(rng, d_in, m, has_bias, scale), x, rng


GAUSSIAN = [a for a in ACTIVATIONS if a.response == "gaussian"]
# (n, d_in, m, seed, has_bias); the single-neuron ones have n < d, so their blocks are singular.
CASES = [(5, 3, 2, 0, True), (7, 2, 3, 1, False), (4, 4, 1, 2, True), (4, 4, 1, 0, False)]
TOL = dict(rtol=1e-10, atol=1e-12)
# The reference programs run once each: skip XLA's backend optimisations to compile them fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

cases = pytest.mark.parametrize("n, d_in, m, seed, has_bias", CASES)


def _block_diag_dense(blocks):
    m, d, _ = blocks.shape
    out = np.zeros((m * d, m * d))
    for l in range(m):
        out[l * d : (l + 1) * d, l * d : (l + 1) * d] = blocks[l]
    return out


# ------------------------------------------------------------------ one neuron / one layer


LINEAR_SIGMAS = (1.0, 0.3, 2.5)


@functools.cache
def _layer_definitions(n, d_in, m, seed, has_bias):
    """The definitions for every activation on one case, as a single compiled program.

    Compiling once per shape rather than once per activation keeps the suite fast; the
    per-activation tests below look their matrix up here.
    """
    params, x, _ = _data(n, d_in, m, seed, has_bias)
    params_sm, x_sm, _ = _data(n, d_in, m + 1, seed, has_bias)
    gaussian = GAUSSIAN + [Linear(sigma=s) for s in LINEAR_SIGMAS]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def compute(params, x, params_sm, x_sm):
        acts = {repr(a): (a,) for a in ACTIVATIONS + gaussian}
        out = _by_family(lambda f, p: _layer_definition(f[0], p[0], params, x), acts)
        jtj = {f"{a!r}/jtj": (a,) for a in gaussian}
        out.update(_by_family(lambda f, p: _gaussian_jtj(f[0], p[0], params, x), jtj))
        out["softmax"] = _layer_definition("softmax", None, params_sm, x_sm)
        return out

    return jax.device_get(compute(params, x, params_sm, x_sm))


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
@cases
def test_nonlinear_rfim_is_definition(act, n, d_in, m, seed, has_bias):
    params, x, _ = _data(n, d_in, m, seed, has_bias)
    metric = nonlinear_rfim(params, x, act)
    assert isinstance(metric, BlockDiagonalMetric)
    assert metric.blocks.shape == (m, d_in + has_bias, d_in + has_bias)
    assert metric.has_bias is has_bias and metric.blocks.dtype == jnp.float64
    expected = _layer_definitions(n, d_in, m, seed, has_bias)
    np.testing.assert_allclose(metric.to_dense(), expected[repr(act)], **TOL)
    if act.response == "gaussian":
        np.testing.assert_allclose(metric.to_dense(), expected[f"{act!r}/jtj"], **TOL)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 1], ids=str)  # single neurons
def test_neuron_rfim_is_definition(act, case):
    n, d_in, _, seed, has_bias = case
    params, x, _ = _data(n, d_in, 1, seed, has_bias)
    expected = _layer_definitions(*case)[repr(act)]
    # Kernel as (d_in, 1) or (d_in,), bias as (1,) or ().
    variants = [params, {"kernel": params["kernel"][:, 0]}]
    if has_bias:
        variants[1]["bias"] = params["bias"][0]
    for p in variants:
        g = neuron_rfim(p, x, act)
        assert g.shape == (d_in + has_bias,) * 2
        np.testing.assert_allclose(g, expected, **TOL)


@pytest.mark.parametrize("sigma", LINEAR_SIGMAS)
@cases
def test_linear_rfim_is_definition(sigma, n, d_in, m, seed, has_bias):
    params, x, _ = _data(n, d_in, m, seed, has_bias)
    metric = linear_rfim(params, x, sigma=sigma)
    assert isinstance(metric, SharedBlockMetric)
    assert metric.num_neurons == m and metric.has_bias is has_bias
    act = Linear(sigma=sigma)
    expected = _layer_definitions(n, d_in, m, seed, has_bias)
    np.testing.assert_allclose(metric.to_dense(), expected[repr(act)], **TOL)
    np.testing.assert_allclose(metric.to_dense(), expected[f"{act!r}/jtj"], **TOL)
    np.testing.assert_allclose(
        metric.to_dense(), nonlinear_rfim(params, x, act).to_dense(), **TOL
    )


@cases
def test_softmax_rfim_is_definition(n, d_in, m, seed, has_bias):
    params, x, _ = _data(n, d_in, m + 1, seed, has_bias)  # at least two classes
    metric = softmax_rfim(params, x)
    assert isinstance(metric, DenseMetric)
    assert metric.num_neurons == m + 1 and metric.has_bias is has_bias
    expected = _layer_definitions(n, d_in, m, seed, has_bias)["softmax"]
    np.testing.assert_allclose(metric.to_dense(), expected, **TOL)


# --------------------------------------------------------------------------- two layers

HIDDEN = [
    Sigmoid(),
    Tanh(),
    ReLU(),
    ReLU(omega=0.5, iota=0.2, sigma=3.0),  # the hidden sigma plays no role
    ReLU(omega=0.0),
    ReLU(omega=0.0, iota=0.1),
    ELU(alpha=0.7),
    GELU(),
    GELUTanh(),
    SiLU(),
    Softplus(sigma=2.0),
]
OUTPUTS = [
    Sigmoid(),
    Tanh(),
    ReLU(),
    ReLU(omega=0.0, iota=0.1, sigma=0.5),
    Linear(sigma=0.7),
    "softmax",
]
# (n, d_in, D_h, D_y, seed, hidden bias, output bias)
TWO_LAYER_CASES = [(4, 2, 3, 2, 0, True, True), (5, 3, 2, 1, 1, False, True),
                   (3, 2, 2, 3, 2, True, False)]


def _two_layer_combos(case):
    """Every (hidden, output) pair on the first case; on the others every hidden activation
    (with the outputs in rotation) and every output (with a smoothed relu hidden layer)."""
    if case == TWO_LAYER_CASES[0]:
        return [(a, o) for a in HIDDEN for o in OUTPUTS]
    shift = TWO_LAYER_CASES.index(case)
    pairs = [(a, OUTPUTS[(i + shift) % len(OUTPUTS)]) for i, a in enumerate(HIDDEN)]
    pairs += [(HIDDEN[3], o) for o in OUTPUTS]
    return list(dict.fromkeys(pairs))


def _two_layer_data(n, d_in, h, k, seed, has_bias, out_bias, out_act):
    params, x, rng = _data(n, d_in, h, seed, has_bias)
    params_out = _layer(rng, h, k, out_bias, scale=1.5)
    if out_act == "softmax":  # three classes
        params_out = _layer(rng, h, 3, out_bias, scale=1.5)
    return params, params_out, x


@functools.cache
def _two_layer_definitions(*case):
    data = {o: _two_layer_data(*case, o) for o in ("softmax", "other")}

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def compute(data):
        out = {}
        for group in ("softmax", "other"):
            pairs = {f"{a!r}|{o!r}": (a, o) for a, o in _two_layer_combos(case)
                     if (o == "softmax") == (group == "softmax")}
            out.update(_by_family(
                lambda f, p, group=group: _two_layer_definition(f[0], p[0], f[1], p[1],
                                                                *data[group]),
                pairs,
            ))
        return out

    return jax.device_get(compute(data))


@pytest.mark.parametrize(
    "case, act, out_act",
    [(c, a, o) for c in TWO_LAYER_CASES for a, o in _two_layer_combos(c)],
    ids=lambda v: repr(v) if not isinstance(v, tuple) else str(v),
)
def test_two_layer_rfim_is_definition(case, act, out_act):
    params, params_out, x = _two_layer_data(*case, out_act)
    metric = two_layer_rfim(params, params_out, x, act, out_act)
    assert isinstance(metric, DenseMetric)
    n, d_in, h, _, _, has_bias, _ = case
    assert metric.num_neurons == h and metric.has_bias is has_bias
    assert metric.matrix.shape == (h * (d_in + has_bias),) * 2
    expected = _two_layer_definitions(*case)[f"{act!r}|{out_act!r}"]
    np.testing.assert_allclose(metric.to_dense(), expected, **TOL)


def test_two_layer_default_output_is_sigmoid_and_strings_work():
    case = TWO_LAYER_CASES[0]
    params, params_out, x = _two_layer_data(*case, Sigmoid())
    expected = _two_layer_definitions(*case)[f"{ReLU()!r}|{Sigmoid()!r}"]
    np.testing.assert_allclose(two_layer_rfim(params, params_out, x, "relu").to_dense(),
                               expected, **TOL)
    np.testing.assert_allclose(
        two_layer_rfim(params, params_out, x, "relu", "sigmoid").to_dense(), expected, **TOL
    )


def test_two_layer_differs_from_paper_nu_product_for_relu():
    # The paper's eq. (26) uses nu_f(z_i) nu_f(z_j) where the chain rule gives f'(z_i) f'(z_j);
    # for relu they differ, and the definition sides with f'.
    case = TWO_LAYER_CASES[0]
    n, d_in, h, k, _, has_bias, out_bias = case
    assert has_bias and out_bias
    act = ReLU(omega=0.5, iota=0.2, sigma=3.0)
    params, params_out, x = _two_layer_data(*case, Sigmoid())
    got = two_layer_rfim(params, params_out, x, act, "sigmoid").to_dense()
    z = x @ params["kernel"] + params["bias"]
    u = act.f(z) @ params_out["kernel"] + params_out["bias"]
    s = _sigmoid(u)
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    nu, c, d = act.nu(z), params_out["kernel"], d_in + 1
    paper = np.zeros_like(got)
    for i in range(h):
        for j in range(h):
            coef = sum(c[i, l] * c[j, l] * s[:, l] * (1 - s[:, l]) for l in range(k))
            coef = coef * nu[:, i] * nu[:, j]
            paper[d * i : d * i + d, d * j : d * j + d] = np.einsum("n,na,nb->ab", coef, xa, xa) / n
    assert np.max(np.abs(paper - got)) > 1e-3
    expected = _two_layer_definitions(*case)[f"{act!r}|{Sigmoid()!r}"]
    np.testing.assert_allclose(got, expected, **TOL)


# ------------------------------------------------------------------ strings, kinds, helpers


@pytest.mark.parametrize("name, obj", [("tanh", Tanh()), ("sigmoid", Sigmoid()), ("relu", ReLU()),
                                       ("elu", ELU()), ("linear", Linear()), ("gelu", GELU()),
                                       ("gelu_tanh", GELUTanh()), ("silu", SiLU()),
                                       ("softplus", Softplus())])
def test_strings_accepted(name, obj):
    params, x, rng = _data(5, 3, 2, 0, True)
    params_out = _layer(rng, 2, 2, True)
    np.testing.assert_array_equal(nonlinear_rfim(params, x, name).blocks,
                                  nonlinear_rfim(params, x, obj).blocks)
    one = {"kernel": params["kernel"][:, :1], "bias": params["bias"][:1]}
    np.testing.assert_array_equal(neuron_rfim(one, x, name), neuron_rfim(one, x, obj))
    np.testing.assert_array_equal(two_layer_rfim(params, params_out, x, name, name).matrix,
                                  two_layer_rfim(params, params_out, x, obj, obj).matrix)


def test_layer_rfim_from_activations_matches_numpy():
    """Each kind against eqs. (22), (23), (25) written out in numpy, sample by sample."""
    params, x, _ = _data(6, 3, 3, 1, True)
    xa = augment(x, True)
    z = x @ params["kernel"] + params["bias"]
    xn, zn = np.asarray(xa), np.asarray(z)
    n, d = xn.shape
    m = zn.shape[1]
    outer = np.einsum("ni,nj->nij", xn, xn)  # x~_i x~_i^T

    # linear (eq. 22): every block A = mean x~ x~^T / sigma^2
    a = outer.mean(0)
    lin = layer_rfim_from_activations(xa, z, "linear")
    assert isinstance(lin, SharedBlockMetric)
    np.testing.assert_allclose(lin.to_dense(), np.kron(np.eye(m), a), **TOL)
    lin2 = layer_rfim_from_activations(xa, z, Linear(sigma=0.5))
    np.testing.assert_allclose(lin2.to_dense(), np.kron(np.eye(m), a / 0.25), **TOL)

    # softmax (eq. 25): block (k, l) = mean (delta_kl eta_k - eta_k eta_l) x~ x~^T
    eta = np.exp(zn - zn.max(1, keepdims=True))
    eta /= eta.sum(1, keepdims=True)
    full = np.zeros((m * d, m * d))
    for k in range(m):
        for l in range(m):
            coef = (k == l) * eta[:, k] - eta[:, k] * eta[:, l]
            full[k * d : (k + 1) * d, l * d : (l + 1) * d] = np.einsum("n,nij->ij", coef, outer) / n
    sm = layer_rfim_from_activations(xa, z, "softmax")
    np.testing.assert_allclose(sm.to_dense(), full, **TOL)

    # hard leaky relu (eq. 16, omega = 0): nu = 1/sigma^2 for z > 0, iota^2/sigma^2 below
    nu = np.where(zn > 0, 1.0, 0.1**2)
    blocks = np.einsum("nl,nij->lij", nu, outer) / n
    nl = layer_rfim_from_activations(xa, z, ReLU(omega=0.0, iota=0.1))
    np.testing.assert_allclose(nl.to_dense(), _block_diag_dense(blocks), **TOL)

    # tanh without a bias (eq. 12): nu = 1 - tanh^2 z, x~ = x
    xr = np.asarray(x)
    zr = xr @ np.asarray(params["kernel"])
    blocks = np.einsum("nl,ni,nj->lij", 1 - np.tanh(zr) ** 2, xr, xr) / n
    nb = layer_rfim_from_activations(x, jnp.asarray(zr), "tanh", has_bias=False)
    assert nb.has_bias is False
    np.testing.assert_allclose(nb.to_dense(), _block_diag_dense(blocks), **TOL)


# ---------------------------------------------------------------------------- structure


def _all_constructors(params, params_out, x):
    act = ReLU(omega=0.5, iota=0.1)
    one = {"kernel": params["kernel"][:, 0], "bias": params["bias"][0]}
    return {
        "linear": linear_rfim(params, x, 0.5).to_dense(),
        "nonlinear": nonlinear_rfim(params, x, act).to_dense(),
        "softmax": softmax_rfim(params, x).to_dense(),
        "two_layer": two_layer_rfim(params, params_out, x, act, "softmax").to_dense(),
        "neuron": neuron_rfim(one, x, "elu"),
    }


def test_jit_every_constructor():
    params, x, rng = _data(5, 3, 2, 0, True)
    params_out = _layer(rng, 2, 3, True)
    eager = _all_constructors(params, params_out, x)
    act = ReLU(omega=0.5, iota=0.1)
    one = {"kernel": params["kernel"][:, 0], "bias": params["bias"][0]}
    jitted = {
        "linear": jax.jit(linear_rfim, static_argnums=2)(params, x, 0.5),
        "nonlinear": jax.jit(nonlinear_rfim, static_argnums=2)(params, x, act),
        "softmax": jax.jit(softmax_rfim)(params, x),
        "two_layer": jax.jit(two_layer_rfim, static_argnums=(3, 4))(
            params, params_out, x, act, "softmax"
        ),
        "neuron": jax.jit(neuron_rfim, static_argnums=2)(one, x, "elu"),
    }
    for name, value in jitted.items():
        value = value if name == "neuron" else value.to_dense()
        np.testing.assert_allclose(value, eager[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_vmap_every_constructor():
    b = 3
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, 5, 3)))
    ps = [_layer(rng, 3, 2, True) for _ in range(b)]
    outs = [_layer(rng, 2, 3, True) for _ in range(b)]
    stack = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    stack_out = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    batched = jax.vmap(_all_constructors)(stack, stack_out, x)
    for i in range(b):
        eager = _all_constructors(ps[i], outs[i], x[i])
        for name in eager:
            np.testing.assert_allclose(batched[name][i], eager[name], rtol=1e-12, atol=1e-14,
                                       err_msg=name)
    # vmap over the data only, with shared params, returning the metric pytree itself.
    metric = jax.vmap(lambda xi: nonlinear_rfim(ps[0], xi, "tanh"))(x)
    assert isinstance(metric, BlockDiagonalMetric) and metric.blocks.shape == (b, 2, 4, 4)
    for i in range(b):
        np.testing.assert_allclose(metric.blocks[i], nonlinear_rfim(ps[0], x[i], "tanh").blocks,
                                   rtol=1e-12)


def test_leading_batch_axes_flatten_into_samples():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 4)))
    params = _layer(rng, 4, 3, True)
    params_out = _layer(rng, 3, 2, True)
    got = _all_constructors(params, params_out, x)
    want = _all_constructors(params, params_out, x.reshape(6, 4))
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize(
    "x_dtype, p_dtype, want",
    [
        (jnp.float32, jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float32, jnp.float32),
    ],
)
def test_dtypes(x_dtype, p_dtype, want):
    params, x, rng = _data(5, 3, 2, 0, True)
    params_out = _layer(rng, 2, 3, True)
    ref = _all_constructors(params, params_out, x)
    cast = lambda t, dt: jax.tree.map(lambda a: a.astype(dt), t)  # noqa: E731
    got = _all_constructors(cast(params, p_dtype), cast(params_out, p_dtype), x.astype(x_dtype))
    # Low-precision inputs are rounded before the (float32) statistics are accumulated.
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}[x_dtype]
    for name, value in got.items():
        assert value.dtype == want, (name, value.dtype)
        scale = np.max(np.abs(ref[name]))
        np.testing.assert_allclose(value, ref[name], atol=tol * scale, err_msg=name)


# ------------------------------------------------------------------------------- errors


def test_errors():
    params, x, rng = _data(5, 3, 2, 0, True)
    params_out = _layer(rng, 2, 1, True)
    with pytest.raises(
        ValueError,
        match=r"nonlinear_rfim: x has 4 features but kernel expects d_in=3 \(kernel shape "
        r"\(3, 2\), x shape \(5, 4\)\)\.",
    ):
        nonlinear_rfim(params, jnp.ones((5, 4)), "tanh")
    with pytest.raises(ValueError, match=r"linear_rfim: x has 2 features but kernel expects"):
        linear_rfim(params, jnp.ones((2, 5, 2)))
    with pytest.raises(ValueError, match=r"softmax_rfim: kernel must be 2-D \(d_in, m\), got shape "
                       r"\(3, 2, 1\)\."):
        softmax_rfim({"kernel": jnp.ones((3, 2, 1))}, x)
    with pytest.raises(ValueError, match=r"nonlinear_rfim: the batch is empty \(x shape \(0, 3\)"):
        nonlinear_rfim(params, jnp.ones((0, 3)), "relu")
    with pytest.raises(ValueError, match=r"the batch is empty \(x shape \(0, 3\)\)"):
        linear_rfim(params, jnp.ones((2, 0, 3)))
    with pytest.raises(
        ValueError,
        match=r"nonlinear_rfim: bias must have shape \(2,\) to match kernel \(3, 2\), got \(3,\)",
    ):
        nonlinear_rfim({"kernel": params["kernel"], "bias": jnp.zeros(3)}, x, "elu")
    with pytest.raises(ValueError, match=r"expected a batch of shape \(n, d\) or \(\.\.\., n, d\), "
                       r"got shape \(3,\)"):
        nonlinear_rfim(params, jnp.ones(3), "tanh")
    with pytest.raises(ValueError, match=r"softmax_rfim: expected a dict with a 'kernel' "
                       r"entry, got keys \['bias', 'w'\]"):
        softmax_rfim({"w": params["kernel"], "bias": params["bias"]}, x)
    with pytest.raises(
        ValueError,
        match=r"two_layer_rfim: params_out kernel expects 3 hidden units, but params has 2",
    ):
        two_layer_rfim(params, _layer(rng, 3, 1, True), x, "tanh")
    with pytest.raises(ValueError, match=r"two_layer_rfim \(params_out\): bias must have shape"):
        two_layer_rfim(params, {"kernel": params_out["kernel"], "bias": jnp.ones(4)}, x, "tanh")
    with pytest.raises(ValueError, match=r"neuron_rfim: expected one neuron, kernel shape "
                       r"\(d_in,\) or \(d_in, 1\), got \(3, 2\)"):
        neuron_rfim({"kernel": params["kernel"]}, x, "tanh")
    with pytest.raises(ValueError, match=r"Unknown activation 'mish'; valid names are"):
        nonlinear_rfim(params, x, "mish")
    with pytest.raises(ValueError, match=r"Unknown activation 'swiglu'; valid names are"):
        two_layer_rfim(params, params_out, x, "tanh", "swiglu")
    with pytest.raises(ValueError, match=r"Linear: sigma must be > 0, got sigma=0.0"):
        linear_rfim(params, x, sigma=0.0)


# ------------------------------------------------------------- representations (SPEC §7)


def _blocks_of(dense, m, d):
    return [dense[l * d : (l + 1) * d, l * d : (l + 1) * d] for l in range(m)]


def _input_moment(x, has_bias):
    xa = np.concatenate([np.asarray(x), np.ones((len(x), 1))], 1) if has_bias else np.asarray(x)
    return xa.T @ xa / len(xa)


REP_ACTS = [a for a in ACTIVATIONS if not isinstance(a, Linear)][:8] + [Linear(sigma=0.3)]


@pytest.mark.parametrize("act", REP_ACTS, ids=repr)
@cases
def test_eigen_and_diagonal_rfim_are_the_definition_in_their_basis(act, n, d_in, m, seed,
                                                                   has_bias):
    params, x, _ = _data(n, d_in, m, seed, has_bias)
    d = d_in + has_bias
    definition = _blocks_of(_layer_definitions(n, d_in, m, seed, has_bias)[repr(act)], m, d)
    eigen = nonlinear_rfim(params, x, act, representation="eigen")
    assert isinstance(eigen, EigenDiagonalMetric)
    u = np.asarray(eigen.basis)
    # U is an orthonormal eigenbasis of A = mean x~ x~^T (computed here in numpy).
    np.testing.assert_allclose(u.T @ u, np.eye(d), atol=1e-12)
    rotated = u.T @ _input_moment(x, has_bias) @ u
    np.testing.assert_allclose(rotated - np.diag(np.diag(rotated)), 0.0, atol=1e-10)
    for l in range(m):
        # s_l = diag(U^T G_l U), hence sum_j s_lj = tr(G_l).
        np.testing.assert_allclose(eigen.scales[l], np.diag(u.T @ definition[l] @ u), **TOL)
        np.testing.assert_allclose(np.sum(eigen.scales[l]), np.trace(definition[l]), **TOL)
    diagonal = nonlinear_rfim(params, x, act, representation="diagonal")
    assert isinstance(diagonal, DiagonalMetric)
    want = np.concatenate([np.diag(b) for b in definition])
    np.testing.assert_allclose(diagonal.to_dense(), np.diag(want), **TOL)
    # A caller's basis is used as given.
    q, _ = np.linalg.qr(np.random.default_rng(seed + 3).normal(size=(d, d)))
    given = nonlinear_rfim(params, x, act, representation="eigen", basis=jnp.asarray(q))
    np.testing.assert_allclose(given.basis, q, **TOL)
    for l in range(m):
        np.testing.assert_allclose(given.scales[l], np.diag(q.T @ definition[l] @ q), **TOL)


@pytest.mark.parametrize("sigma", LINEAR_SIGMAS)
@cases
def test_linear_eigen_rfim_equals_exact(sigma, n, d_in, m, seed, has_bias):
    params, x, _ = _data(n, d_in, m, seed, has_bias)
    expected = _layer_definitions(n, d_in, m, seed, has_bias)[repr(Linear(sigma=sigma))]
    eigen = linear_rfim(params, x, sigma=sigma, representation="eigen")
    assert isinstance(eigen, EigenDiagonalMetric) and eigen.scales.shape == (m, d_in + has_bias)
    np.testing.assert_allclose(eigen.to_dense(), expected, **TOL)
    diagonal = linear_rfim(params, x, sigma=sigma, representation="diagonal")
    np.testing.assert_allclose(diagonal.to_dense(), np.diag(np.diag(expected)), **TOL)


@cases
def test_softmax_eigen_and_diagonal_are_unit_wise(n, d_in, m, seed, has_bias):
    # Unit-wise: the (k, k) diagonal blocks of eq. (25), the cross-class blocks dropped.
    params, x, _ = _data(n, d_in, m + 1, seed, has_bias)
    d = d_in + has_bias
    full = _layer_definitions(n, d_in, m, seed, has_bias)["softmax"]
    blocks = _blocks_of(full, m + 1, d)
    eigen = softmax_rfim(params, x, representation="eigen")
    u = np.asarray(eigen.basis)
    for k in range(m + 1):
        np.testing.assert_allclose(eigen.scales[k], np.diag(u.T @ blocks[k] @ u), **TOL)
    diagonal = softmax_rfim(params, x, representation="diagonal")
    np.testing.assert_allclose(
        diagonal.to_dense(), np.diag(np.concatenate([np.diag(b) for b in blocks])), **TOL
    )


@pytest.mark.parametrize("representation", ["eigen", "diagonal"])
def test_representations_in_float32(representation):
    params, x, _ = _data(40, 5, 4, 0, True)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    got = nonlinear_rfim(params32, x.astype(jnp.float32), "tanh", representation=representation)
    assert got.scales.dtype == jnp.float32
    exact = nonlinear_rfim(params, x, "tanh").to_dense()
    if representation == "eigen":
        u = np.asarray(got.basis, np.float64)
        d = u.shape[0]
        for l in range(4):
            block = exact[l * d : (l + 1) * d, l * d : (l + 1) * d]
            np.testing.assert_allclose(got.scales[l], np.diag(u.T @ block @ u), rtol=2e-4,
                                       atol=1e-5)
    else:
        np.testing.assert_allclose(got.to_dense(), np.diag(np.diag(exact)), rtol=1e-5,
                                   atol=1e-6)


def test_representation_errors():
    params, x, _ = _data(6, 3, 2, 0, True)
    with pytest.raises(ValueError, match=r"unknown representation 'kfac'; valid ones are "
                                         r"'exact', 'eigen', 'diagonal'"):
        nonlinear_rfim(params, x, "tanh", representation="kfac")
    with pytest.raises(ValueError, match=r"basis must be \(4, 4\) for inputs of width d=4, "
                                         r"got \(3, 3\)"):
        nonlinear_rfim(params, x, "tanh", representation="eigen", basis=jnp.eye(3))
    with pytest.raises(ValueError, match=r"basis is only used by representation='eigen'"):
        nonlinear_rfim(params, x, "tanh", representation="diagonal", basis=jnp.eye(4))


def test_a_basis_that_is_not_orthonormal_is_refused():
    """A scaled or skewed basis gave eigen metrics off by its Gram matrix (trace 4x the
    exact one for 2 I) with no error; an orthogonal one (QR of a random matrix) is kept."""
    params, x, _ = _data(6, 3, 2, 0, True)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    got = nonlinear_rfim(params, x, "tanh", representation="eigen", basis=jnp.asarray(q))
    exact = nonlinear_rfim(params, x, "tanh")
    np.testing.assert_allclose(got.trace(), exact.trace(), rtol=1e-5)
    for bad in (2 * np.eye(4), q + 0.01 * np.tri(4), np.full((4, 4), np.nan)):
        with pytest.raises(ValueError, match=r"basis \(4, 4\) must have orthonormal columns "
                                             r"\(U\^T U = I.*max \|U\^T U - I\|"):
            nonlinear_rfim(params, x, "tanh", representation="eigen",
                           basis=jnp.asarray(bad, jnp.float32))
    # A float32 eigenbasis with float64 rows is held to float32's tolerance, not float64's.
    x64 = np.asarray(x, np.float64)
    _, u32 = np.linalg.eigh(np.cov(np.random.default_rng(2).normal(size=(4, 50))))
    u32 = u32.astype(np.float32)
    assert np.abs(u32.astype(np.float64).T @ u32 - np.eye(4)).max() > 1e-12
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    got64 = nonlinear_rfim(p64, x64, "tanh", representation="eigen", basis=jnp.asarray(u32))
    assert got64.scales.dtype == np.float64
    # Under jit the basis is traced: the caller's responsibility, no host read.
    jitted = jax.jit(lambda b: nonlinear_rfim(params, x, "tanh", representation="eigen",
                                              basis=b).trace())
    np.testing.assert_allclose(jitted(jnp.asarray(q, jnp.float32)), exact.trace(), rtol=1e-5)


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_softmax_over_one_output_is_refused(representation):
    """Eq. (25) over one class is identically 0 (eta = 1): a metric of zeros, accepted with
    no word, whose solve only divides by the damping."""
    params = {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}
    with pytest.raises(ValueError, match=r"kind 'softmax' needs at least 2 outputs \(classes\), "
                                         r"got 1.*'sigmoid'"):
        softmax_rfim(params, jnp.ones((5, 3)), representation=representation)


def test_layer_rfim_from_activations_checks_its_rows_and_accumulates_in_float32():
    """An empty batch gave an all-NaN metric, bad shapes raw reshape errors, and bfloat16 rows
    bfloat16 blocks (3e-3 off) or a LAPACK error with the eigen representation."""
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    for bad, match in (((np.ones((0, 3)), np.ones((0, 2))), r"the batch is empty"),
                       ((np.ones((5, 3)), np.ones((4, 2))), r"different sample counts"),
                       ((np.ones(3), np.ones(2)), r"expected x_aug \(n, d\)"),
                       ((np.ones((2, 5, 3)), np.ones((2, 5, 2))), r"flatten leading batch")):
        with pytest.raises(ValueError, match=match):
            layer_rfim_from_activations(*map(jnp.asarray, bad), "tanh")
    xb, zb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(z, jnp.bfloat16)
    # Independently, in float64 from the same bfloat16 values (eq. 23, tanh: nu = 1 - tanh^2).
    x64, z64 = np.asarray(xb, np.float64), np.asarray(zb, np.float64)
    nu = 1.0 - np.tanh(z64) ** 2
    want = np.einsum("nl,ni,nj->lij", nu, x64, x64) / len(x64)
    got = layer_rfim_from_activations(xb, zb, "tanh", has_bias=False)
    assert got.blocks.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got.blocks), want, rtol=1e-5, atol=1e-6)
    eigen = layer_rfim_from_activations(xb, zb, "tanh", representation="eigen", has_bias=False)
    assert eigen.scales.dtype == jnp.float32


def test_layer_rfim_from_activations_refuses_rows_without_the_bias_column():
    """Captured inputs come without the 1: read as augmented, their last input was taken for
    the bias and the metric came out (m, d_in, d_in) with no error."""
    rng = np.random.default_rng(1)
    x, z = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    with pytest.raises(ValueError, match=r"has_bias=True takes the augmented inputs.*"
                                         r"\(20, 4\).*has_bias=False"):
        layer_rfim_from_activations(jnp.asarray(x), jnp.asarray(z), "relu")
    x_aug = np.concatenate([x, np.ones((20, 1))], 1)
    got = layer_rfim_from_activations(jnp.asarray(x_aug), jnp.asarray(z), "relu")
    nu = (1.0 / (1.0 + np.exp(-z))) ** 2  # relu(omega=1): nu = sigmoid(z)^2 (eq. 18)
    want = np.einsum("nl,ni,nj->lij", nu, x_aug, x_aug) / 20
    np.testing.assert_allclose(np.asarray(got.blocks), want, rtol=1e-6)
    # Inside jit the rows are traced and not checked (the optimiser's own rows are built
    # augmented).
    jax.jit(lambda a, b: layer_rfim_from_activations(a, b, "relu").blocks)(x_aug, z)


def test_neuron_rfim_errors_name_neuron_rfim_and_the_kernel_as_given():
    with pytest.raises(ValueError, match=r"^neuron_rfim: x has 4 features but kernel expects "
                                         r"d_in=3"):
        neuron_rfim({"kernel": jnp.ones(3), "bias": jnp.zeros(())}, jnp.ones((7, 4)), "tanh")
