"""Messages that used to mislead (robustness issue, item 8), each asserted exactly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rfim_jax


def _layer():
    rng = np.random.default_rng(0)
    return {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4))), "bias": jnp.zeros(4)}}


def test_single_example_without_batch_axis_says_so():
    params = _layer()
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"})
    acts = {"Dense_0": {"inputs": jnp.ones(3), "preacts": jnp.ones((1, 4))}}
    match = (r"layer 'Dense_0': inputs have shape \(3,\) with no sample axis; a single example "
             r"needs one, shape \(1, 3\)")
    with pytest.raises(ValueError, match=match):
        tx.update(params, tx.init(params), activations=acts)


def test_kind_names_are_case_insensitive_everywhere():
    rng = np.random.default_rng(1)
    x, z = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 4)))
    xa = jnp.concatenate([x, jnp.ones((5, 1))], 1)
    upper = rfim_jax.layer_rfim_from_activations(xa, z, "Softmax")
    lower = rfim_jax.layer_rfim_from_activations(xa, z, "softmax")
    np.testing.assert_array_equal(upper.to_dense(), lower.to_dense())


def test_unknown_kind_lists_each_valid_kind_once():
    with pytest.raises(ValueError) as err:
        rfim_jax.scale_by_rngd({"Dense_0": "swish"}).init(_layer())
    msg = str(err.value)
    assert "layer 'Dense_0': unknown kind 'swish'" in msg
    for name in rfim_jax.ACTIVATION_NAMES + ("softmax",):
        assert len(re.findall(rf"(?<!\w){re.escape(name)}(?!\w)", msg)) == 1, name


def test_a_metric_of_kind_none_says_none_is_pass_through():
    """A metric constructor given None said "unknown kind None" and then listed None as valid."""
    x, z = jnp.ones((4, 2)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"layer_rfim_from_activations: kind None "
                                         r"\(pass-through\) has no RFIM.*scale_by_rngd's layers"):
        rfim_jax.layer_rfim_from_activations(x, z, None)


def test_none_is_listed_as_a_kind_only_where_it_is_one():
    """None (pass-through) is a kind of an optimiser's layers, not of a metric."""
    x, z = jnp.ones((4, 2)), jnp.ones((4, 3))
    with pytest.raises(ValueError) as err:
        rfim_jax.layer_rfim_from_activations(x, z, "swish")
    assert "unknown kind 'swish'" in str(err.value) and "None" not in str(err.value)
    with pytest.raises(ValueError, match=r"layer 'Dense_0': unknown kind 'swish'.*"
                                         r"or None \(pass-through\)"):
        rfim_jax.scale_by_rngd({"Dense_0": "swish"})


def test_a_layer_whose_whole_subtree_another_transform_owns_is_named_masked():
    """optax.partition with a prefix label masks the whole layer dict (a MaskedNode where the
    layer was); naming it said "not a dense layer" and listed the layers without it."""
    params = {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
              "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    labels = {"Dense_0": "rngd", "Dense_1": "adam"}

    def partition(layers):
        return optax.partition({"rngd": rfim_jax.rngd(0.1, layers), "adam": optax.adam(1e-3)},
                               labels)

    with pytest.raises(ValueError, match=r"layer 'Dense_1' is masked out of this transform "
                                         r"\(optax.partition or optax.masked"):
        partition({"Dense_0": "relu", "Dense_1": "linear"}).init(params)
    partition({"Dense_0": "relu", "Dense_1": None}).init(params)  # pass-through: accepted


def test_a_bias_only_layer_says_it_has_no_kernel_scale_or_embedding():
    """A LayerNorm(use_scale=False) named in layers: the error now says what the node holds."""
    params = {"n": {"bias": jnp.zeros(3)}, "Dense_0": {"kernel": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match=r"layer 'n' is not a dense layer of the params.*"
                                         r"holds only \['bias'\].*use_scale=False"):
        rfim_jax.rngd(0.1, {"n": "linear"}).init(params)


def test_a_transposed_kernel_is_named_with_the_shape_the_metric_needs():
    """solve() with a (m, d_in) kernel blamed the bias and never named the kernel shape."""
    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    metric = rfim_jax.nonlinear_rfim(params, jnp.asarray(np.eye(4, 3)), "tanh")
    with pytest.raises(ValueError, match=r"BlockDiagonalMetric.solve: kernel has shape \(2, 3\), "
                                         r"but this metric is for a kernel of shape \(3, 2\)"):
        metric.solve({"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(2)}, 0.1)


def test_whitening_refuses_a_non_linear_kind():
    with pytest.raises(ValueError, match=r"scale_by_whitening: layer 'Dense_0' was given kind "
                                         r"'softmax', but whitening is the 'linear' kind"):
        rfim_jax.scale_by_whitening({"Dense_0": "softmax"})
    rfim_jax.scale_by_whitening({"Dense_0": "linear"})  # accepted


METRIC_METHODS = ("to_dense", "matvec", "solve", "inverse", "damped", "trace", "diagonal",
                  "eigvalsh", "max_eigenvalue")


@pytest.mark.parametrize("cls", [rfim_jax.SharedBlockMetric, rfim_jax.BlockDiagonalMetric,
                                 rfim_jax.DenseMetric, rfim_jax.EigenDiagonalMetric,
                                 rfim_jax.DiagonalMetric])
def test_every_metric_method_has_a_docstring(cls):
    missing = [n for n in METRIC_METHODS if not (getattr(cls, n).__doc__ or "").strip()]
    assert not missing, f"{cls.__name__}: no docstring on {missing}"
    assert "relative" in cls.solve.__doc__ and "damping" in cls.damped.__doc__


def test_solver_docstrings_name_the_public_methods_tuple():
    for fn in (rfim_jax.spd_inverse, rfim_jax.spd_solve, rfim_jax.spd_inverse_and_status):
        doc = fn.__doc__ or ""
        assert "METHODS" not in doc.replace("SOLVER_METHODS", ""), fn.__name__


@pytest.mark.parametrize("damping", [-1.0, float("nan")])
def test_negative_or_nan_damping_is_refused_everywhere(damping):
    blocks = jnp.eye(3)[None] * 2.0
    metrics = [
        rfim_jax.BlockDiagonalMetric(blocks, has_bias=False),
        rfim_jax.SharedBlockMetric(blocks[0], num_neurons=2, has_bias=False),
        rfim_jax.DiagonalMetric(jnp.ones((2, 3)), has_bias=False),
        rfim_jax.EigenDiagonalMetric(jnp.eye(3), jnp.ones((2, 3)), has_bias=False),
    ]
    v = {"kernel": jnp.ones((3, 2))}
    for metric in metrics:
        for call in (lambda m: m.damped(damping), lambda m: m.inverse(damping),
                     lambda m: m.solve(v, damping)):
            with pytest.raises(ValueError, match=r"damping must be >= 0, got"):
                call(metric)
    with pytest.raises(ValueError, match=r"damping must be >= 0"):
        rfim_jax.add_damping(blocks, damping)


@pytest.mark.parametrize("build, match", [
    (lambda: rfim_jax.scale_by_rngd({"Dense_0": "swish"}), r"layer 'Dense_0': unknown kind"),
    (lambda: rfim_jax.rngd(0.1, {"Dense_0": "relu"}, representation="kfac"),
     r"representation: unknown representation 'kfac'"),
    (lambda: rfim_jax.scale_by_rngd({"Dense_0": "relu"}, representation={"Dense_0": "kfac"}),
     r"layer 'Dense_0': unknown representation 'kfac'"),
    (lambda: rfim_jax.scale_by_rngd(None, default_kind="swish"),
     r"default_kind: unknown kind 'swish'"),
    (lambda: rfim_jax.scale_by_whitening(None, stacked_layers="Dense_0"),
     r"stacked_layers must be a list"),
    (lambda: rfim_jax.rngd(0.1, {}), r"layers is empty.*plain momentum SGD"),
])
def test_arguments_that_need_no_params_are_checked_when_the_transform_is_built(build, match):
    """A typo in a kind or representation fails where it is written, not at the first init."""
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_layers_must_be_a_mapping_when_built():
    with pytest.raises(TypeError, match=r"layers must map layer paths to kinds.*got list"):
        rfim_jax.scale_by_rngd(["Dense_0"])


def test_a_state_from_other_layers_is_refused_with_the_layer_named():
    """A checkpoint restored after a layer's kind or width changed, or grads without a bias."""
    p8 = {"Dense_0": {"kernel": jnp.full((3, 8), 0.1), "bias": jnp.zeros(8)}}
    p6 = {"Dense_0": {"kernel": jnp.full((3, 6), 0.1), "bias": jnp.zeros(6)}}
    x = jnp.ones((4, 3))

    def acts(p):
        return {"Dense_0": {"inputs": x, "preacts": x @ p["Dense_0"]["kernel"]}}

    def update(tx, state, p, grads=None):
        grads = jax.tree.map(jnp.ones_like, p) if grads is None else grads
        return tx.update(grads, state, p, activations=acts(p))

    relu_diag = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, representation="diagonal")
    linear_diag = rfim_jax.scale_by_rngd({"Dense_0": "linear"}, representation="diagonal")
    with pytest.raises(ValueError, match=r"layer 'Dense_0': the RNGD state has shapes "
                                         r"\(\{'S': \(8, 4\)\}, \{\}\).*kind 'linear'.*"
                                         r"needs \(\{'S': \(1, 4\)\}, \{\}\)"):
        update(linear_diag, relu_diag.init(p8), p8)
    relu = rfim_jax.scale_by_rngd({"Dense_0": "relu"})
    with pytest.raises(ValueError, match=r"layer 'Dense_0': the RNGD state has shapes "
                                         r"\(\(8, 4, 4\), \(8, 4, 4\)\).*m=6.*Re-run init"):
        update(relu, relu.init(p8), p6)
    no_bias = {"Dense_0": {"kernel": jnp.ones((3, 8))}}
    with pytest.raises(ValueError, match=r"layer 'Dense_0'.*d=3.*bias included"):
        update(relu, relu.init(p8), p8, grads=no_bias)
    both = {**p8, "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    state = rfim_jax.scale_by_rngd({"Dense_0": "relu", "Dense_1": "linear"}).init(both)
    with pytest.raises(ValueError, match=r"does not precondition: \['Dense_1'\]"):
        update(relu, state, p8)


def test_grads_without_a_layer_are_named_as_the_grads():
    """Grads missing a layer that the params have were reported as 'not a dense layer of the
    params', blaming the (complete) params."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
              "Dense_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu", "Dense_1": "linear"})
    rows = {"inputs": jnp.ones((4, 3)), "preacts": jnp.ones((4, 2))}
    acts = {"Dense_0": rows, "Dense_1": {"inputs": jnp.ones((4, 2)), "preacts": rows["preacts"]}}
    grads = {"Dense_0": jax.tree.map(jnp.ones_like, params["Dense_0"])}
    with pytest.raises(ValueError, match=r"layer 'Dense_1' is not a dense layer of the grads.*"
                                         r"found in the grads: \['Dense_0'\]"):
        tx.update(grads, tx.init(params), params, activations=acts)


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_softmax_on_one_output_is_refused_at_init(representation):
    """A one-logit head given kind 'softmax' kept a zero metric with no word (eq. 25 over one
    class is 0) and only counted a fallback at the first refresh."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}}
    tx = rfim_jax.scale_by_rngd({"Dense_0": "softmax"}, representation=representation)
    with pytest.raises(ValueError, match=r"layer 'Dense_0': kind 'softmax' needs at least 2 "
                                         r"outputs \(classes\), got 1.*'sigmoid'"):
        tx.init(params)


def test_missing_activations_say_what_the_activations_hold():
    """Activations nested one level too deep, or with other keys, were reported as 'no
    activations passed' with no word of what was passed."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
              "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"})
    state = tx.init(params)
    rows = {"inputs": jnp.ones((4, 3)), "preacts": jnp.ones((4, 2))}
    cases = [
        ({"params": {"Dense_0": rows}},
         r"layer 'Dense_0': no activations passed; .*the activations hold the layers "
         r"\['params/Dense_0'\]"),
        ({"Dense_0": {"x": 1, "z": 2}}, r"'Dense_0'.*has the keys \['x', 'z'\]"),
        ({"other": 1}, r"'Dense_0'.*no recorded layer"),
    ]
    for acts, match in cases:
        with pytest.raises(ValueError, match=match):
            tx.update(params, state, activations=acts)
    norm = rfim_jax.scale_by_rngd({"LayerNorm_0": "linear"})
    with pytest.raises(ValueError, match=r"'LayerNorm_0'.*BatchNorm and GroupNorm are not "
                                         r"recorded"):
        norm.update(params, norm.init(params), activations={})


def test_rows_with_different_leading_axes_are_refused():
    """inputs (2, 5, d) with preacts (5, 2, m) have 10 rows each and were paired wrongly."""
    params = {"D": {"kernel": jnp.ones((6, 8)), "bias": jnp.zeros(8)}}
    tx = rfim_jax.scale_by_rngd({"D": "relu"})
    state = tx.init(params)
    bad = {"D": {"inputs": jnp.ones((2, 5, 6)), "preacts": jnp.ones((5, 2, 8))}}
    with pytest.raises(ValueError, match=r"'D': inputs and preacts have different leading "
                                         r"\(sample\) axes, \(2, 5\) and \(5, 2\)"):
        tx.update(params, state, activations=bad)
    # One side already flattened pairs row-major, as before.
    flat = {"D": {"inputs": jnp.ones((10, 6)), "preacts": jnp.ones((5, 2, 8))}}
    tx.update(params, state, activations=flat)
