"""The Fisher-Rao norm (Liang et al., Lemma 2.1) against theta^T F theta, and the lemma itself.

References, independent of the JVP route that ``fisher_rao_norm`` takes:

* model form: ``theta^T F theta`` with F the dense FIM of ``full_fisher`` (itself checked
  against the definition in test_fisher.py) and theta from ``ravel_neuron_major``;
* empirical form: the empirical FIM ``mean_i g_i g_i^T`` built here from per-sample
  ``jax.grad`` of a hand-written log-likelihood with respect to a ``ravel_pytree`` vector.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import rfim_jax
from rfim_jax import fisher_rao_norm, full_fisher, ravel_neuron_major

TOL = dict(rtol=1e-10, atol=1e-12)


def _dense(rng, d_in, m, bias=True, scale=1.5):
    p = {"kernel": jnp.asarray(rng.normal(size=(d_in, m)) * scale / np.sqrt(d_in))}
    if bias:
        p["bias"] = jnp.asarray(rng.normal(size=(m,)) * 0.5)
    return p


def _net_params(seed, d_in=3, h=4, k=3):
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": _dense(rng, d_in, h),
        "Dense_1": _dense(rng, h, k),
        "LayerNorm_0": {"scale": jnp.asarray(1.0 + 0.3 * rng.normal(size=(h,)))},
    }
    return params, jnp.asarray(rng.normal(size=(5, d_in))), rng


def _net(params, x):
    """A small tanh network with biases and a non-dense leaf: no homogeneity to lean on."""
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    h = h * params["LayerNorm_0"]["scale"]
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def _net_first(params, x):
    return _net(params, x)[:, 0]


def _log_lik(response, sigma, o, y):
    """ln p(y | o) for one sample, written out (y one-hot for a categorical response)."""
    if response == "categorical":
        return jnp.sum(y * (o - jnp.log(jnp.sum(jnp.exp(o)))))
    if response == "bernoulli":
        s = 1.0 / (1.0 + jnp.exp(-o))
        return jnp.sum(y * jnp.log(s) + (1 - y) * jnp.log(1 - s))
    return jnp.sum(-0.5 * ((y - o) / sigma) ** 2 - jnp.log(sigma * np.sqrt(2 * np.pi)))


def _model_reference(model, params, x, response, sigma=1.0):
    theta, _ = ravel_neuron_major(params)
    matrix = full_fisher(model, params, x, response, sigma=sigma).matrix
    return theta @ matrix @ theta


def _empirical_reference(model, params, x, y, response, sigma=1.0):
    """theta^T F_emp theta, F_emp = mean_i grad l_i grad l_i^T, by per-sample jax.grad."""
    theta, unravel = ravel_pytree(params)

    def log_lik(t, xi, yi):
        return _log_lik(response, sigma, model(unravel(t), xi[None])[0], yi)

    grads = jnp.stack([jax.grad(log_lik)(theta, x[i], y[i]) for i in range(x.shape[0])])
    fim = grads.T @ grads / x.shape[0]
    return theta @ fim @ theta


def _labels(rng, response, n, k):
    if response == "categorical":
        idx = rng.integers(0, k, size=n)
        return jnp.asarray(idx), jnp.eye(k)[idx]
    if response == "bernoulli":
        y = jnp.asarray(rng.integers(0, 2, size=(n, k)).astype(float))
    else:
        y = jnp.asarray(rng.normal(size=(n, k)))
    return y, y


# ------------------------------------------------------------- against theta^T F theta


@pytest.mark.parametrize("response, sigma", [("categorical", 1.0), ("bernoulli", 1.0),
                                             ("gaussian", 0.7)])
def test_model_form_is_theta_F_theta(response, sigma, seed):
    params, x, _ = _net_params(seed)
    got = fisher_rao_norm(_net, params, x, response, sigma=sigma)
    want = _model_reference(_net, params, x, response, sigma)
    assert got.shape == () and got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, **TOL)
    assert got > 0


@pytest.mark.parametrize("response, sigma", [("categorical", 1.0), ("bernoulli", 1.0),
                                             ("gaussian", 0.7)])
def test_empirical_form_is_theta_Femp_theta(response, sigma, seed):
    params, x, rng = _net_params(seed)
    labels, y = _labels(rng, response, x.shape[0], 3)
    got = fisher_rao_norm(_net, params, x, response, labels=labels, sigma=sigma)
    want = _empirical_reference(_net, params, x, y, response, sigma)
    np.testing.assert_allclose(got, want, **TOL)
    if response == "categorical":  # one-hot rows give the same as class indices
        np.testing.assert_allclose(
            fisher_rao_norm(_net, params, x, response, labels=y), got, rtol=1e-13)
    # The empirical form is a different quantity from the model form.
    model = fisher_rao_norm(_net, params, x, response, sigma=sigma)
    assert abs(got - model) > 1e-3 * model


@pytest.mark.parametrize("response", ["bernoulli", "gaussian"])
def test_single_output_and_leading_axes(response):
    params, x, rng = _net_params(0)
    got = fisher_rao_norm(_net_first, params, x, response)
    np.testing.assert_allclose(got, _model_reference(_net_first, params, x, response), **TOL)
    y, _ = _labels(rng, response, x.shape[0], 1)
    emp = fisher_rao_norm(_net_first, params, x, response, labels=y[:, 0])
    np.testing.assert_allclose(emp, _empirical_reference(_net_first, params, x, y, response),
                               **TOL)
    # Outputs (b, s, k): N = b s samples, as in full_fisher.
    x6 = jnp.concatenate([x, x[:1]])
    flat = fisher_rao_norm(_net, params, x6, response)
    np.testing.assert_allclose(fisher_rao_norm(_net, params, x6.reshape(2, 3, 3), response),
                               flat, rtol=1e-13)


def test_any_pytree_and_gaussian_scaling():
    # A list/tuple pytree with no "kernel" naming at all; the norm does not care about layout.
    rng = np.random.default_rng(3)
    params = [jnp.asarray(rng.normal(size=(3, 4))), (jnp.asarray(rng.normal(size=(4, 2))),
                                                     jnp.asarray(rng.normal(size=(2,))))]

    def model(p, x):
        return jnp.sin(x @ p[0]) @ p[1][0] + p[1][1]

    x = jnp.asarray(rng.normal(size=(4, 3)))
    theta, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda t: model(unravel(t), x))(theta).reshape(-1, theta.size)
    want = jnp.sum((jac @ theta) ** 2) / x.shape[0]  # J^T J / sigma^2, sigma = 1
    np.testing.assert_allclose(fisher_rao_norm(model, params, x, "gaussian"), want, **TOL)
    np.testing.assert_allclose(fisher_rao_norm(model, params, x, "gaussian", sigma=0.5),
                               4 * want, **TOL)


# ------------------------------------------------------------------------- Lemma 2.1


def _relu_mlp_params(rng, widths, bias):
    return {f"Dense_{t}": _dense(rng, widths[t], widths[t + 1], bias, scale=1.0)
            for t in range(len(widths) - 1)}


def _relu_mlp(params, x):
    """L hidden ReLU layers, L + 1 weight matrices, linear output (logits or mean)."""
    names = sorted(params, key=lambda s: int(s.split("_")[1]))
    h = x
    for t, name in enumerate(names):
        h = h @ params[name]["kernel"]
        if "bias" in params[name]:
            h = h + params[name]["bias"]
        if t < len(names) - 1:
            h = jax.nn.relu(h)
    return h


def _lemma_case(seed, depth, bias, k=3):
    rng = np.random.default_rng(100 * depth + seed)
    widths = [3] + [4] * depth + [k]
    params = _relu_mlp_params(rng, widths, bias)
    x = jnp.asarray(rng.normal(size=(6, 3)))
    return params, x, rng


def _output_scores(response, f, y, sigma=1.0):
    """dl/df per sample by jax.grad of the written-out log-likelihood."""
    return jax.vmap(jax.grad(functools.partial(_log_lik, response, sigma)))(f, y)


def _model_expectation_of_squared_score_product(response, f, sigma=1.0):
    """E_{y ~ p(y|f_i)} [<dl/df, f_i>^2] per sample, exactly (sum over outcomes / Gaussian)."""
    n, k = f.shape
    if response == "categorical":
        ys = jnp.eye(k)
        probs = jax.nn.softmax(f, axis=-1)
        inner = jax.vmap(lambda fi: jax.vmap(
            lambda y: _output_scores(response, fi[None], y[None])[0] @ fi)(ys))(f)
        return jnp.sum(probs * inner**2, axis=-1)
    if response == "bernoulli":  # outputs independent: sum_a s(1-s) f_a^2
        s = jax.nn.sigmoid(f)
        return jnp.sum(s * (1 - s) * f**2, axis=-1)
    return jnp.sum(f**2, axis=-1) / sigma**2  # E[((y - f)/sigma^2 . f)^2] = |f|^2 / sigma^2


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_lemma_2_1_structure_in_gradient(depth, seed):
    # <grad_theta f(x), theta> = (L + 1) f(x) for a bias-free ReLU MLP, any random weights.
    params, x, _ = _lemma_case(seed, depth, bias=False)
    f, v = jax.jvp(lambda p: _relu_mlp(p, x), (params,), (params,))
    np.testing.assert_allclose(v, (depth + 1) * f, rtol=1e-12, atol=1e-13)
    # The same through the dense Jacobian, <grad f_a(x_i), theta> per output.
    theta, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda t: _relu_mlp(unravel(t), x))(theta)
    np.testing.assert_allclose(jac @ theta, (depth + 1) * f, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("response", ["categorical", "bernoulli", "gaussian"])
def test_lemma_2_1_norm_identity(depth, response, seed):
    # ||theta||_fr^2 = (L + 1)^2 E[<dl/df, f>^2], model and empirical forms.
    params, x, rng = _lemma_case(seed, depth, bias=False)
    f = _relu_mlp(params, x)
    c = (depth + 1) ** 2
    model = fisher_rao_norm(_relu_mlp, params, x, response)
    np.testing.assert_allclose(
        model, c * jnp.mean(_model_expectation_of_squared_score_product(response, f)), **TOL)
    np.testing.assert_allclose(model, _model_reference(_relu_mlp, params, x, response), **TOL)
    labels, y = _labels(rng, response, x.shape[0], f.shape[1])
    emp = fisher_rao_norm(_relu_mlp, params, x, response, labels=labels)
    scores = _output_scores(response, f, y)
    np.testing.assert_allclose(emp, c * jnp.mean(jnp.sum(scores * f, axis=-1) ** 2), **TOL)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_lemma_2_1_fails_with_biases(depth):
    # With biases the network is not homogeneous in theta: J theta != (L + 1) f, and the
    # norm is no longer (L + 1)^2 E[<dl/df, f>^2].  fisher_rao_norm itself stays exact.
    params, x, rng = _lemma_case(0, depth, bias=True)
    f, v = jax.jvp(lambda p: _relu_mlp(p, x), (params,), (params,))
    rel = jnp.linalg.norm(v - (depth + 1) * f) / jnp.linalg.norm((depth + 1) * f)
    assert rel > 1e-2, rel
    for response in ("categorical", "bernoulli", "gaussian"):
        got = fisher_rao_norm(_relu_mlp, params, x, response)
        np.testing.assert_allclose(got, _model_reference(_relu_mlp, params, x, response),
                                   **TOL, err_msg=response)
        lemma = (depth + 1) ** 2 * jnp.mean(
            _model_expectation_of_squared_score_product(response, f))
        assert abs(got - lemma) / got > 1e-2, (response, got, lemma)
    labels, y = _labels(rng, "categorical", x.shape[0], f.shape[1])
    emp = fisher_rao_norm(_relu_mlp, params, x, "categorical", labels=labels)
    lemma = (depth + 1) ** 2 * jnp.mean(
        jnp.sum(_output_scores("categorical", f, y) * f, axis=-1) ** 2)
    assert abs(emp - lemma) / emp > 1e-2, (emp, lemma)


# ---------------------------------------------------------------------- jit and errors


def test_jit_grad_and_export():
    assert "fisher_rao_norm" in rfim_jax.__all__
    params, x, rng = _net_params(1)
    labels, _ = _labels(rng, "categorical", x.shape[0], 3)
    norm = jax.jit(fisher_rao_norm, static_argnums=(0, 3))
    np.testing.assert_allclose(norm(_net, params, x, "categorical"),
                               fisher_rao_norm(_net, params, x, "categorical"), rtol=1e-13)
    np.testing.assert_allclose(norm(_net, params, x, "categorical", labels=labels),
                               fisher_rao_norm(_net, params, x, "categorical", labels=labels),
                               rtol=1e-13)
    # sigma may be traced.
    eager = fisher_rao_norm(_net, params, x, "gaussian")
    traced = jax.jit(lambda s: fisher_rao_norm(_net, params, x, "gaussian", sigma=s))(0.5)
    np.testing.assert_allclose(traced, 4 * eager, rtol=1e-13)
    # Differentiable in params (e.g. as a regulariser): grad against central differences.
    grad = jax.jit(jax.grad(lambda p: fisher_rao_norm(_net, p, x, "bernoulli")))(params)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    eps = 1e-5

    def at(t):
        return fisher_rao_norm(_net, jax.tree.map(lambda a, d: a + t * d, params, direction), x,
                               "bernoulli")

    fd = (at(eps) - at(-eps)) / (2 * eps)
    dot = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, grad, direction)))
    np.testing.assert_allclose(dot, fd, rtol=1e-6)


def test_float32():
    params, x, _ = _net_params(2)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    got = fisher_rao_norm(_net, p32, x.astype(jnp.float32), "categorical")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, fisher_rao_norm(_net, params, x, "categorical"), rtol=1e-4)


def test_errors():
    params, x, _ = _net_params(0)
    with pytest.raises(ValueError, match=r"fisher_rao_norm: unknown response 'poisson'; valid "
                       r"responses are 'bernoulli', 'categorical', 'gaussian'\."):
        fisher_rao_norm(_net, params, x, "poisson")
    with pytest.raises(ValueError, match=r"fisher_rao_norm: sigma must be > 0, got sigma=0.0"):
        fisher_rao_norm(_net, params, x, "gaussian", sigma=0.0)
    with pytest.raises(ValueError, match=r"model_fn must return outputs of shape \(n, k\) for a "
                       r"'categorical' response, got shape \(5,\)"):
        fisher_rao_norm(_net_first, params, x, "categorical")
    with pytest.raises(ValueError, match=r"labels must be integer class indices of shape "
                       r"\(5,\) or one-hot rows of shape \(5, 3\); got labels of shape \(4,\)"):
        fisher_rao_norm(_net, params, x, "categorical", labels=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"got labels of shape \(5,\) and dtype float64"):
        fisher_rao_norm(_net, params, x, "categorical", labels=jnp.zeros(5))
    with pytest.raises(ValueError, match=r"for a 'bernoulli' response, labels must have the "
                       r"outputs' shape \(5, 3\); got labels of shape \(5,\)"):
        fisher_rao_norm(_net, params, x, "bernoulli", labels=jnp.zeros(5))
    with pytest.raises(ValueError, match=r"'gaussian' response, labels must have the outputs' "
                       r"shape \(5,\); got labels of shape \(5, 1\)"):
        fisher_rao_norm(_net_first, params, x, "gaussian", labels=jnp.zeros((5, 1)))
    ints = jax.tree.map(lambda a: a.astype(jnp.int32), params)
    with pytest.raises(TypeError, match=r"fisher_rao_norm: params must be floating point.*"
                                        r"dtype int32 and shape"):
        fisher_rao_norm(_net, ints, x, "categorical")
    # Errors are raised at trace time under jit too.
    with pytest.raises(ValueError, match=r"labels must have the outputs' shape"):
        jax.jit(lambda p: fisher_rao_norm(_net, p, x, "gaussian", labels=jnp.zeros((5, 2))))(
            params)


def test_class_indices_outside_the_classes_are_not_silently_zero():
    """An index >= k was an all-zero one-hot row and gave a plausible number (0.0 here)."""
    params, x, _ = _net_params(0)
    bad = jnp.asarray([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"class indices range over \[0, 3\], outside the "
                                         r"outputs' 3 classes \[0, 2\]"):
        fisher_rao_norm(_net, params, x, "categorical", labels=bad)
    traced = jax.jit(lambda y: fisher_rao_norm(_net, params, x, "categorical", labels=y))
    assert np.isnan(traced(bad))
    good = jnp.asarray([0, 1, 2, 2, 0])
    np.testing.assert_allclose(traced(good), fisher_rao_norm(_net, params, x, "categorical",
                                                             labels=good), rtol=1e-12)


def test_empty_batches_and_complex_labels_are_refused():
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}

    def model(p, x):
        return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    with pytest.raises(ValueError, match=r"fisher_rao_norm: the batch is empty"):
        fisher_rao_norm(model, params, jnp.ones((0, 3)), "categorical")
    with pytest.raises(TypeError, match=r"fisher_rao_norm: labels: complex dtype"):
        fisher_rao_norm(model, params, jnp.ones((4, 3)), "gaussian",
                        labels=jnp.ones((4, 2), jnp.complex64))
    with pytest.raises(ValueError, match=r"fisher_rao_norm: sigma must be > 0"):
        fisher_rao_norm(model, params, jnp.ones((4, 3)), "gaussian", sigma=np.float32(-1))


def test_bernoulli_labels_outside_zero_one_are_refused_when_known():
    params = {"Dense_0": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}}

    def model(p, x):
        return (x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])[:, 0]

    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"'bernoulli' labels must lie in \[0, 1\], got values "
                                         r"in \[0, 3\]"):
        fisher_rao_norm(model, params, x, "bernoulli", labels=jnp.asarray([0.0, 1.0, 3.0, 1.0]))
    soft = jnp.asarray([0.0, 0.25, 1.0, 0.5])  # soft labels in [0, 1] are Bernoulli means
    got = fisher_rao_norm(model, params, x, "bernoulli", labels=soft)
    # The empirical form by hand: v_i = o_i (the model is linear in its params), score y - s(o).
    o = np.asarray(model(params, x))
    want = np.mean(((np.asarray(soft) - 1 / (1 + np.exp(-o))) * o) ** 2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Traced labels cannot be read: the check is the caller's there.
    jax.jit(lambda y: fisher_rao_norm(model, params, x, "bernoulli", labels=y))(soft)
