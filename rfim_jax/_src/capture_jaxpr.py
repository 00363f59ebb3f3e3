"""Capture from an unmodified plain-JAX function, by reading its jaxpr (SPEC §1, "Capture helpers").

:func:`rfim_jax.record` needs the user to add a line per layer to the model. This module finds
the dense layers in the function's own program instead: ``jax.make_jaxpr`` traces it once, each
``dot_general`` that multiplies by a params leaf ``<path>/kernel`` is a use of layer ``<path>``,
its other operand is the layer's input ``x`` and the ``add`` of ``<path>/bias`` to the product
(if the layer has a bias) is the pre-activation ``z = x @ kernel + bias``. The jaxpr is then
evaluated with those values as extra outputs (``jax.extend.core.jaxpr_as_fun``), so the
recorded arrays are the very values of the forward pass and gradients flow as through the
function itself.

Only public ``jax.extend`` names are used (``ClosedJaxpr``, ``Jaxpr.replace``, ``jaxpr_as_fun``,
``jaxprs_in_params``, ``Literal``): the matcher reads eqns, it never rebinds them, because
rebinding is what broke kfac-jax's graph matcher across jax releases (``get_bind_params``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from rfim_jax._src import paths as paths_lib
from rfim_jax._src.capture import Unsupported, _Recorder

SOURCE = "capture_jax"
BIAS = "bias"

# Ops that hand a kernel (or bias, or product) on with the same values in another dtype or
# memory layout: the matcher looks through them.
_SAME_VALUES = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
# Ops that bring a bias to the product's shape.
_BROADCASTS = frozenset({"broadcast_in_dim", "reshape", "expand_dims", "squeeze"})
_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})
_ADDS = frozenset({"add", "add_any"})


def _raw_key(entry: Any) -> Any:
    """A key-path entry as the key itself (an ``int`` index stays an ``int``)."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _is_dynamic(leaf: Any) -> bool:
    # Arrays (tracers included) become jaxpr inputs; Python values (flags, sizes) stay static,
    # as they would under jit's static arguments.
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _sub_jaxprs(eqn) -> list:
    return list(jex.jaxprs_in_params(eqn.params))


def _reaches_product(jaxpr, derived: set) -> bool:
    """Whether values computed from ``derived`` vars reach a ``dot_general`` or a conv."""
    derived = set(derived)
    for eqn in jaxpr.eqns:
        used = [v for v in eqn.invars if not isinstance(v, jex.Literal) and v in derived]
        if not used:
            continue
        if eqn.primitive.name in _PRODUCTS:
            return True
        for sub in _sub_jaxprs(eqn):
            # Call-like eqns pass their operands 1:1; for the others (scan, cond, while) any
            # inner input may hold the value, so all count.
            inner = (
                {iv for iv, ov in zip(sub.invars, eqn.invars, strict=True) if ov in used}
                if len(sub.invars) == len(eqn.invars) else set(sub.invars)
            )
            if _reaches_product(sub, inner):
                return True
        derived.update(eqn.outvars)
    return False


class _Use:
    """One product ``x @ kernel`` of a layer, found in the jaxpr."""

    def __init__(self, keys: tuple, x, axis: int, out, kernel_first: bool):
        self.keys = keys
        self.x, self.axis = x, axis  # the input var and its contracted axis
        self.z, self.kernel_first = out, kernel_first  # the product var (then the bias sum)
        self.biased = False


def _match(jaxpr, kernels: dict, biases: dict, has_bias: set) -> tuple[list[_Use], dict]:
    """The uses of every layer in ``jaxpr``'s top level, and the layers that cannot be read.

    Args:
      jaxpr: the function's jaxpr.
      kernels: invar -> layer keys, for each layer's kernel (rank >= 2).
      biases: invar -> layer keys, for each layer's bias.
      has_bias: the layers with a bias.

    Returns:
      ``(uses, unsupported)``: the products in program order, and layer keys -> why.
    """
    kernel = {v: (keys, False) for v, keys in kernels.items()}  # var -> (keys, transposed)
    bias = dict(biases)
    # Vars computed from a kernel by anything but a relabelling: a product of one of them is
    # a transformed kernel (a mask, a weight norm) whose layer cannot be read as x @ kernel.
    tainted: dict = {}
    # var -> (_Use, whether the neuron axis is first), for a product and its relabellings.
    product: dict = {}
    uses: list[_Use] = []
    unsupported: dict = {}

    def reject(keys, why):
        unsupported.setdefault(keys, why)

    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        ins = [None if isinstance(v, jex.Literal) else v for v in eqn.invars]
        k_ins = [(i, kernel[v]) for i, v in enumerate(ins) if v in kernel]
        t_ins = [tainted[v] for v in ins if v in tainted]
        if prim in _SAME_VALUES and len(ins) == 1:
            v, out = ins[0], eqn.outvars[0]
            if v in kernel:
                kernel[out] = kernel[v]
            if v in bias:
                bias[out] = bias[v]
            if v in product:
                product[out] = product[v]
            if v in tainted:
                tainted[out] = tainted[v]
            continue
        if prim == "transpose" and k_ins and eqn.params["permutation"] == (1, 0):
            keys, transposed = k_ins[0][1]
            kernel[eqn.outvars[0]] = (keys, not transposed)
            continue
        if prim == "transpose" and ins[0] in product:
            # (m, n...) <-> (n..., m): a kernel-first product brought to the usual layout.
            use, m_first = product[ins[0]]
            perm, rank = tuple(eqn.params["permutation"]), len(eqn.params["permutation"])
            rolled = (tuple(range(1, rank)) + (0,)) if m_first else ((rank - 1,)
                                                                      + tuple(range(rank - 1)))
            if perm == rolled:
                product[eqn.outvars[0]] = (use, not m_first)
                continue
        if prim in _BROADCASTS and ins[0] in bias:
            bias[eqn.outvars[0]] = bias[ins[0]]
            continue
        if prim in _ADDS and len(ins) == 2:
            a, b = ins
            for p, q in ((a, b), (b, a)):
                use, m_first = product.get(p, (None, False))
                if use is not None and not use.biased and bias.get(q) == use.keys:
                    use.z, use.kernel_first, use.biased = eqn.outvars[0], m_first, True
                    break
        if prim == "dot_general" and k_ins:
            if len(k_ins) > 1 or len(eqn.invars) != 2:
                for _, (keys, _) in k_ins:
                    reject(keys, "multiplied by another kernel")
                continue
            pos, (keys, transposed) = k_ins[0]
            k_shape = tuple(eqn.invars[pos].aval.shape)
            if len(k_shape) != 2:
                reject(keys, f"of rank {len(k_shape)}, shape {k_shape}, in a dot_general: "
                             "only a (d_in, m) kernel is read; record a multi-axis layer with "
                             "rfim_jax.record, its contracted axes flattened")
                continue
            (contract, batch) = eqn.params["dimension_numbers"]
            k_axes, x_axes = tuple(contract[pos]), tuple(contract[1 - pos])
            # The kernel's input axis (0, or 1 of its transpose) must be the one contracted.
            if batch != ((), ()) or k_axes != ((1,) if transposed else (0,)) or len(x_axes) != 1:
                x_shape = tuple(eqn.invars[1 - pos].aval.shape)
                reject(keys, f"multiplied over another axis than x @ kernel: dot_general of "
                             f"an operand {x_shape} with the kernel{'.T' if transposed else ''} "
                             f"{k_shape}, dimension_numbers "
                             f"{eqn.params['dimension_numbers']}; expected inputs (n..., d_in) "
                             f"contracted with the kernel's axis 0")
                continue
            x = eqn.invars[1 - pos]
            use = _Use(keys, x, x_axes[0], eqn.outvars[0], kernel_first=pos == 0)
            uses.append(use)
            product[eqn.outvars[0]] = (use, use.kernel_first)
            continue
        if prim == "conv_general_dilated" and k_ins:
            reject(k_ins[0][1][0], "a convolution's: record its patches with rfim_jax.record "
                                   "and rfim_jax.conv_patches, or use a Flax nn.Conv with "
                                   "capture_linen or capture_nnx")
            continue
        if prim in _PRODUCTS and t_ins:
            for keys in t_ins:
                reject(keys, f"transformed before its product ({prim}), as by a mask or a "
                             "weight norm; the product is then not x @ kernel")
            continue
        subs = _sub_jaxprs(eqn)
        entering = [(i, kernel[v][0] if v in kernel else tainted[v])
                    for i, v in enumerate(ins) if v in kernel or v in tainted]
        if subs and entering:
            for i, keys in entering:
                # Call-like eqns pass operand i as inner input i; scan, cond and while lay
                # their inputs out otherwise, so any inner input may hold it.
                inner = [({sub.invars[i]} if len(sub.invars) == len(eqn.invars)
                          else set(sub.invars), sub) for sub in subs]
                if any(_reaches_product(sub, vs) for vs, sub in inner):
                    hint = ("jit that function with inline=True, or record the layer with "
                            "rfim_jax.record" if prim in ("pjit", "jit", "closed_call")
                            else "record the layer with rfim_jax.record inside it")
                    reject(keys, f"multiplied inside a nested `{prim}`, whose values "
                                 f"capture_jax cannot read: {hint}")
        # Anything else computed from a kernel is not a layer use (a weight-decay term, a
        # norm): it only taints its outputs.
        for keys in [k for _, (k, _) in k_ins] + t_ins:
            for out in eqn.outvars:
                tainted[out] = keys
    for use in uses:
        if use.keys in has_bias and not use.biased:
            reject(use.keys, "multiplied, but the layer's bias is not added to that product "
                             "directly, so z = x @ kernel + bias is not in the program")
    return uses, unsupported


def capture_jax(
    fn: Callable[..., Any],
    params: Mapping,
    *args: Any,
    skip_unsupported: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``fn(params, *args, **kwargs)``, also returning every dense layer's activations.

    For a plain-JAX model left as it is: no :func:`rfim_jax.record` lines. A *layer* is a
    mapping in ``params`` that holds a rank-2 ``"kernel"`` (d_in, m) and optionally a
    ``"bias"`` (m,), as for :func:`rfim_jax.scale_by_rngd`. Each product of an array ``x``
    (n..., d_in) with the kernel in ``fn`` (``x @ kernel``, ``jnp.dot``, ``jnp.einsum``, through
    dtype casts and ``kernel.T.T``) is a use of the layer; the activations hold its
    ``{"inputs": x, "preacts": z}`` with ``z = x @ kernel + bias`` (the sum ``fn`` computes),
    shapes (n..., d_in) and (n..., m), at the layer's path (``activations["block"]["Dense_0"]``
    for ``params["block"]["Dense_0"]``). A layer used several times (tied weights, a Python
    loop) has every use stacked as extra rows (SPEC §8). Other uses of a kernel (a
    weight-decay term) are not layer uses; a kernel ``fn`` never multiplies by is left out.

    The function is traced once with ``jax.make_jaxpr`` and its program evaluated with the
    activations as extra outputs, so the recorded arrays are the forward pass's own values,
    and gradients through ``jax.value_and_grad(..., has_aux=True)`` are those of ``fn``::

        def loss_fn(params):
            logits, acts = rfim_jax.capture_jax(mlp_apply, params, x)
            return cross_entropy(logits, y), acts

        (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    Array arguments (``jax.Array``, numpy arrays) are traced; other arguments (flags, sizes)
    are passed to ``fn`` as Python values. Under ``jit`` the tracing happens once, at trace
    time.

    Args:
      fn: ``fn(params, *args, **kwargs)``, any plain-JAX function (a model's apply or a loss).
      params: the params pytree, nested mappings down to each layer.
      *args: ``fn``'s other positional arguments.
      skip_unsupported: leave out the layers the capture cannot read (see Raises) instead of
        raising; their params then pass through ``scale_by_rngd`` unchanged when not named in
        its ``layers``.
      **kwargs: ``fn``'s keyword arguments.

    Returns:
      ``(output, activations)``: ``fn``'s output, and the activations of the layers found.

    Raises:
      ValueError: naming the layer, when a kernel is multiplied in a way that is not
        ``x @ kernel`` (a convolution, a product over another axis, a transformed kernel such
        as ``kernel * mask``), inside a nested ``jax.jit`` or a control-flow primitive
        (``lax.scan``, ``lax.cond``, ``jax.checkpoint``), or without its bias added directly to
        the product; or when the uses of one layer have different widths.

    References:
      Sun & Nielsen, Sec. 5, eqs. (31)-(33): the RFIM of each layer from the batch that gives
      the gradient. SPEC §1 (capture helpers), §8 (a layer used several times).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    kernels, biases, has_bias = {}, {}, set()
    layer_keys = {}
    for keypath, leaf in leaves:
        keys = tuple(_raw_key(k) for k in keypath)
        if keys and str(keys[-1]) == paths_lib.KERNEL and jnp.ndim(leaf) >= 2:
            layer_keys[keys[:-1]] = True
    extra_leaves, extra_tree = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(extra_leaves) if _is_dynamic(leaf)]

    def traced(p, dyn):
        full = list(extra_leaves)
        for i, value in zip(dynamic, dyn, strict=True):
            full[i] = value
        a, kw = jax.tree_util.tree_unflatten(extra_tree, full)
        return fn(p, *a, **kw)

    dyn_values = [extra_leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(params, dyn_values)
    # A ClosedJaxpr holds a Jaxpr and its consts; newer jax folds the two into one object.
    jaxpr = getattr(closed, "jaxpr", closed)
    param_vars = jaxpr.invars[:len(leaves)]
    for var, (keypath, _) in zip(param_vars, leaves, strict=True):
        keys = tuple(_raw_key(k) for k in keypath)
        owner, last = keys[:-1], str(keys[-1]) if keys else ""
        if owner in layer_keys and last == paths_lib.KERNEL:
            kernels[var] = owner
        elif owner in layer_keys and last == BIAS:
            biases[var] = owner
            has_bias.add(owner)

    uses, unsupported = _match(jaxpr, kernels, biases, has_bias)
    recorder = _Recorder(SOURCE)
    for keys, why in unsupported.items():
        name = paths_lib.SEP.join(map(str, keys)) or "<root>"
        if not skip_unsupported:
            raise Unsupported(
                f"{SOURCE}: layer {name!r}: its kernel is {why}. Pass skip_unsupported=True to "
                f"leave the layer out of the activations; its params then pass through "
                f"scale_by_rngd unchanged when not named in `layers`."
            )
        recorder.dropped.add(keys)
    uses = [u for u in uses if u.keys not in unsupported]

    extra = [v for u in uses for v in (u.x, u.z)]
    n_out = len(jaxpr.outvars)
    new_jaxpr = jaxpr.replace(outvars=list(jaxpr.outvars) + extra)
    new_closed = new_jaxpr if jaxpr is closed else closed.replace(jaxpr=new_jaxpr)
    values = jex.jaxpr_as_fun(new_closed)(*jax.tree.leaves(params), *dyn_values)
    output = jax.tree.unflatten(jax.tree.structure(out_shape), values[:n_out])
    for i, use in enumerate(uses):
        x, z = values[n_out + 2 * i], values[n_out + 2 * i + 1]
        x = jnp.moveaxis(x, use.axis, -1)
        if use.kernel_first:
            z = jnp.moveaxis(z, 0, -1)
        recorder.add(use.keys, x, z)
    return output, recorder.tree()

