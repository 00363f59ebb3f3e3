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

try:  # The public home of the jaxpr types; older jax kept them in jax.core only.
    from jax.extend import core as jex

    jex.jaxpr_as_fun, jex.jaxprs_in_params, jex.Literal  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed jax
    from jax import core as jex

from rfim_jax._src import paths as paths_lib
from rfim_jax._src.capture import Unsupported, _Recorder

SOURCE = "capture_jax"
BIAS = "bias"

# Ops that hand a kernel (or bias, or product) on with the same values: a float cast (checked
# in _relabels), a copy, a name or a sharding annotation. The matcher looks through them.
_RELABELS = frozenset({"convert_element_type", "copy", "copy_p", "stop_gradient", "name",
                       "sharding_constraint"})
_PRODUCTS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot",
                       "ragged_dot_general"})
# Ops whose result depends on their operands in a way the matcher cannot read.
_OPAQUE = frozenset({"pure_callback", "io_callback", "custom_call"})
_ADDS = frozenset({"add", "add_any"})
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})


def _is_dynamic(leaf: Any) -> bool:
    # Arrays (tracers included) become jaxpr inputs; Python values (flags, sizes) and numpy
    # scalars (np.int64(3)) stay static, as they would under jit's static arguments.
    return isinstance(leaf, (jax.Array, np.ndarray))


def _sub_jaxprs(eqn) -> list:
    return list(jex.jaxprs_in_params(eqn.params))


def _relabels(eqn) -> bool:
    """Whether ``eqn`` passes its one operand on with the same values."""
    if eqn.primitive.name not in _RELABELS or len(eqn.invars) != 1:
        return False
    if eqn.primitive.name != "convert_element_type":
        return True
    # A float-to-float cast rounds (bf16, fp8) but is the value the product uses; a cast to an
    # integer, or from complex to real, is not a relabelling.
    dtypes = (eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype)
    return any(all(jnp.issubdtype(d, kind) for d in dtypes)
               for kind in (jnp.floating, jnp.complexfloating))


def _live_vars(jaxpr) -> set:
    """The vars the function's outputs (or its effects, such as a debug print) depend on."""
    live = {v for v in jaxpr.outvars if not isinstance(v, jex.Literal)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, jex.Literal))
    return live


def _reaches_product(jaxpr, derived: set) -> bool:
    """Whether values computed from ``derived`` vars reach a product, an opaque op, or an
    elementwise product with another array (inputs are not told apart from constants here)."""
    derived = set(derived)
    for eqn in jaxpr.eqns:
        used = [v for v in eqn.invars if not isinstance(v, jex.Literal) and v in derived]
        if not used:
            continue
        if eqn.primitive.name in _PRODUCTS | _OPAQUE:
            return True
        if eqn.primitive.name == "mul" and any(
                v not in derived and len(v.aval.shape) >= 2 for v in eqn.invars):
            return True  # an elementwise product with an array: a product in disguise
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


def _bias_axis(eqn, axis):
    """Where a bias's neuron axis lands after a broadcast, reshape or squeeze, or False when
    the op moves values across axes (not a bias broadcast any more). ``None``: m = 1."""
    prim, old = eqn.primitive.name, tuple(eqn.invars[0].aval.shape)
    new = tuple(eqn.outvars[0].aval.shape)
    if prim == "broadcast_in_dim":
        return None if axis is None else eqn.params["broadcast_dimensions"][axis]
    if prim == "squeeze":
        return None if axis is None else axis - sum(d < axis for d in eqn.params["dimensions"])
    if prim == "reshape":
        old_nz = [i for i, n in enumerate(old) if n != 1]
        new_nz = [i for i, n in enumerate(new) if n != 1]
        if [old[i] for i in old_nz] != [new[i] for i in new_nz]:
            return False
        return None if axis is None or old[axis] == 1 else new_nz[old_nz.index(axis)]
    return False


def _check_closed_over(closed, kernel_leaves: dict) -> None:
    """Raises if ``fn`` read a kernel from a closure instead of its ``params`` argument: the
    kernel is then a constant of the program and its layer would be missing silently."""
    consts = {id(c) for c in getattr(closed, "consts", ())}
    for keys, leaf in kernel_leaves.items():
        if id(leaf) in consts:
            raise ValueError(
                f"{SOURCE}: layer {paths_lib.display_path(keys)!r}: fn reads its kernel from "
                f"a closure, not from its params argument, so capture_jax cannot tell its "
                f"products from "
                f"constants. Pass the params to fn: capture_jax(fn, params, ...) calls "
                f"fn(params, ...)."
            )


def _check_not_nested(used: set) -> None:
    """Raises if one recorded layer's params hold another's: one activations node cannot
    hold both a layer's "inputs"/"preacts" and another layer (as rfim_jax.record refuses)."""
    for outer in used:
        for inner in used:
            if len(outer) < len(inner) and inner[:len(outer)] == outer:
                raise ValueError(
                    f"{SOURCE}: layer {paths_lib.display_path(outer)!r} holds layer "
                    f"{paths_lib.display_path(inner)!r} in its "
                    f"params; the activations keep one layer's inputs and preacts per node, "
                    f"so both cannot be recorded. Move the inner layer beside the outer one "
                    f"in the params tree."
                )


class _Use:
    """One product ``x @ kernel`` of a layer, found in the jaxpr."""

    def __init__(self, keys: tuple, x, axis: int, out, m_axis: int):
        self.keys = keys
        self.x, self.axis = x, axis  # the input var and its contracted axis
        self.product = out  # the dot_general's output var
        self.m_axis = m_axis  # the neuron axis in the dot_general's output: 0 or last
        # The pre-activation var, and perm: its axis j is the product's axis perm[j].
        self.z, self.perm = out, tuple(range(len(out.aval.shape)))
        self.biased = False


def _match(jaxpr, kernels: dict, biases: dict, data: set) -> tuple[list[_Use], dict]:
    """The uses of every layer in ``jaxpr``'s top level, and the layers that cannot be read.

    Args:
      jaxpr: the function's jaxpr.
      kernels: invar -> layer keys, for each layer's kernel (rank >= 2).
      biases: invar -> layer keys, for each layer's bias.
      data: the invars and constvars that are not params (the function's inputs).

    Returns:
      ``(uses, unsupported)``: the live products in program order, and layer keys -> why.
      Products and other uses that the output never sees are neither.
    """
    live = _live_vars(jaxpr)
    kernel = {v: (keys, False) for v, keys in kernels.items()}  # var -> (keys, transposed)
    bias = {v: (keys, (len(v.aval.shape) - 1) if v.aval.shape else None)
            for v, keys in biases.items()}  # var -> (keys, its neuron axis; None: any)
    # var -> the layers it is computed from: a *weight*, computed from kernels (and constants)
    # only, by more than a relabelling (a mask, a weight norm, a product of kernels). A value
    # that also depends on the inputs is data, never a weight, so that one layer the matcher
    # cannot read does not hide the layers after it.
    weight: dict = {}
    product: dict = {}  # var -> (_Use, perm), for a product and its relabellings
    biased: dict = {}  # var -> _Use, for a pre-activation x @ kernel + bias
    data = set(data)
    uses: list[_Use] = []
    unsupported: dict = {}

    def reject(layers, why, eqn):
        if eqn.effects or any(o in live for o in eqn.outvars):
            for keys in sorted(layers, key=str):
                unsupported.setdefault(keys, why)

    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        ins = [None if isinstance(v, jex.Literal) else v for v in eqn.invars]
        w_ins = {i: frozenset({kernel[v][0]}) if v in kernel else weight[v]
                 for i, v in enumerate(ins) if v is not None and (v in kernel or v in weight)}
        w_layers = frozenset().union(*w_ins.values())
        has_data = any(v in data for v in ins if v is not None)
        if has_data:
            data.update(eqn.outvars)
        out = eqn.outvars[0] if eqn.outvars else None
        if _relabels(eqn) or prim == "optimization_barrier":
            for v, o in zip(ins, eqn.outvars, strict=True):
                for table in (kernel, bias, product, weight, biased):
                    if v in table:
                        table[o] = table[v]
            continue
        if prim == "transpose" and ins[0] in kernel and eqn.params["permutation"] == (1, 0):
            keys, transposed = kernel[ins[0]]
            kernel[out] = (keys, not transposed)
            continue
        if prim == "transpose" and ins[0] in product:
            use, perm = product[ins[0]]
            product[out] = (use, tuple(perm[q] for q in eqn.params["permutation"]))
            continue
        if ins and ins[0] in bias and prim in ("broadcast_in_dim", "reshape", "squeeze"):
            axis = _bias_axis(eqn, bias[ins[0]][1])
            if axis is not False:
                bias[out] = (bias[ins[0]][0], axis)
                continue
        if prim in _ADDS and len(ins) == 2:
            for p, q in ((ins[0], ins[1]), (ins[1], ins[0])):
                if q not in bias:
                    continue
                if p in biased and biased[p].keys == bias[q][0]:
                    reject({bias[q][0]}, "multiplied, and its bias is added to the product "
                                         "twice", eqn)
                use, perm = product.get(p, (None, None))
                if use is None or use.biased or bias[q][0] != use.keys:
                    continue
                axis, want = bias[q][1], perm.index(use.m_axis)
                if out.aval.shape != p.aval.shape or axis not in (None, want):
                    reject({use.keys}, f"multiplied, and its bias is added along axis {axis} "
                                       f"of the product {tuple(p.aval.shape)} (result "
                                       f"{tuple(out.aval.shape)}), not along its neuron axis "
                                       f"{want}", eqn)
                use.z, use.perm, use.biased = out, perm, True
                biased[out] = use
                break
        if prim == "dot_general" and len(w_ins) == 1 and ins[next(iter(w_ins))] in kernel:
            pos = next(iter(w_ins))
            keys, transposed = kernel[ins[pos]]
            k_shape = tuple(ins[pos].aval.shape)
            if len(k_shape) != 2:
                reject({keys}, f"of rank {len(k_shape)}, shape {k_shape}, in a dot_general: "
                               "only a (d_in, m) kernel is read. Record a multi-axis layer "
                               "with rfim_jax.record, its contracted axes flattened; for a "
                               "stack of layers or an ensemble, vmap capture_jax over the "
                               "stacked params", eqn)
                continue
            (contract, batch) = eqn.params["dimension_numbers"]
            k_axes, x_axes = tuple(contract[pos]), tuple(contract[1 - pos])
            # The kernel's input axis (0, or 1 of its transpose) must be the one contracted.
            if batch != ((), ()) or k_axes != ((1,) if transposed else (0,)) or len(x_axes) != 1:
                x_shape = tuple(eqn.invars[1 - pos].aval.shape)
                reject({keys}, f"multiplied over another axis than x @ kernel: dot_general "
                               f"of an operand {x_shape} with the "
                               f"kernel{'.T' if transposed else ''} {k_shape}, "
                               f"dimension_numbers {eqn.params['dimension_numbers']}; expected "
                               f"inputs (n..., d_in) contracted with the kernel's axis 0", eqn)
                continue
            m_axis = 0 if pos == 0 else len(out.aval.shape) - 1
            use = _Use(keys, eqn.invars[1 - pos], x_axes[0], out, m_axis)
            uses.append(use)
            product[out] = (use, use.perm)
            continue
        if prim == "dot_general" and w_ins and (has_data or len(w_ins) < len(
                [v for v in ins if v is not None])):
            reject(w_layers, "transformed before its product, so the product is not "
                             "x @ kernel (a mask, a weight norm, a product of kernels)", eqn)
        elif prim == "conv_general_dilated" and w_ins:
            reject(w_layers, "a convolution's: record its patches with rfim_jax.record and "
                             "rfim_jax.conv_patches, or use a Flax nn.Conv with capture_linen "
                             "or capture_nnx", eqn)
        elif prim in (_PRODUCTS | _OPAQUE) - {"dot_general"} and w_ins:
            reject(w_layers, f"used in `{prim}`, whose product capture_jax cannot read", eqn)
        elif prim in ("mul", "div") and w_ins:
            scaled = [product[v][0] if v in product else biased[v]
                      for v in ins if v in product or v in biased]
            for use in scaled:
                reject({use.keys}, "multiplied, and the product is then scaled by a function "
                                   "of a kernel (a weight norm), so the pre-activation is not "
                                   "x @ kernel + bias", eqn)
            arrays = [v for i, v in enumerate(ins) if v is not None and i not in w_ins]
            if (not scaled and any(len(v.aval.shape) >= 2 for v in arrays)
                    and any(ins[i].aval.shape for i in w_ins)):
                reject(w_layers, "multiplied elementwise with an array, as in "
                                 "(x[..., None] * kernel).sum(-2); write the product as "
                                 "x @ kernel", eqn)
        subs = _sub_jaxprs(eqn)
        for i, layers in w_ins.items() if subs else ():
            # Call-like eqns pass operand i as inner input i; scan, cond and while lay their
            # inputs out otherwise, so any inner input may hold it.
            inner = [({sub.invars[i]} if len(sub.invars) == len(eqn.invars) else set(sub.invars),
                      sub) for sub in subs]
            if any(_reaches_product(sub, vs) for vs, sub in inner):
                name = eqn.params.get("name")
                where = (f"a nested jax.jit{f' of `{name}`' if name else ''}: jit it with "
                         "inline=True, or record the layer with rfim_jax.record"
                         if prim in _CALLS else
                         f"a nested `{prim}`: record the layer with rfim_jax.record inside it")
                reject(layers, f"multiplied inside {where}", eqn)
        # Anything else computed from kernels alone is a weight (or a weight-decay term, which
        # no product reads); with the inputs in it, it is data.
        if w_layers and not has_data:
            for o in eqn.outvars:
                weight[o] = w_layers
    uses = [u for u in uses if u.product in live]  # a product the output never sees
    has_bias = set(biases.values())
    for use in uses:
        if use.keys in has_bias and not use.biased:
            unsupported.setdefault(
                use.keys, "multiplied, but the layer's bias is not added to that product "
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
    (n..., d_in) with the kernel in ``fn`` (``x @ kernel``, ``jnp.dot``, ``jnp.einsum`` in any
    axis order, ``jax.vmap`` over any axis; through float casts, transposes, ``stop_gradient``,
    ``checkpoint_name`` and sharding constraints) is a use of the layer; the activations hold its
    ``{"inputs": x, "preacts": z}`` with ``z = x @ kernel + bias`` (the sum ``fn`` computes),
    shapes (n..., d_in) and (n..., m), at the layer's path (``activations["block"]["Dense_0"]``
    for ``params["block"]["Dense_0"]``). A layer used several times (tied weights, a Python
    loop) has every use stacked as extra rows (SPEC §8). A product the output never sees is not
    a use, nor are other uses of a kernel (a weight-decay term, ``kernel.T @ kernel``); a kernel
    ``fn`` never multiplies by is left out.

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
        as ``kernel * mask`` or an integer cast, ``ragged_dot``, a callback, an elementwise
        product with the inputs), inside a nested ``jax.jit`` (named) or a control-flow
        primitive (``lax.scan``, ``lax.cond``, ``jax.checkpoint``), without its bias added
        directly to the product, with the bias added twice or along another axis than the
        neurons', or with the product scaled by a function of the kernel (a weight norm);
        when ``fn`` reads a kernel from a closure instead of ``params``; when a used layer's
        params hold another used layer; or when the uses of one layer have different widths.

    References:
      Sun & Nielsen, Sec. 5, eqs. (31)-(33): the RFIM of each layer from the batch that gives
      the gradient. SPEC §1 (capture helpers), §8 (a layer used several times).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    leaf_keys = [tuple(paths_lib.raw_key(k) for k in keypath) for keypath, _ in leaves]
    # A layer: the keys of a mapping that holds a "kernel" of rank >= 2 -> that kernel.
    kernel_leaves = {keys[:-1]: leaf for keys, (_, leaf) in zip(leaf_keys, leaves, strict=True)
                     if keys and str(keys[-1]) == paths_lib.KERNEL and jnp.ndim(leaf) >= 2}
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
    kernels, biases = {}, {}  # invar -> its layer's keys
    for var, keys in zip(jaxpr.invars[:len(leaves)], leaf_keys, strict=True):
        owner, last = keys[:-1], str(keys[-1]) if keys else ""
        if owner in kernel_leaves and last in (paths_lib.KERNEL, BIAS):
            (kernels if last == paths_lib.KERNEL else biases)[var] = owner

    _check_closed_over(closed, kernel_leaves)
    data = set(jaxpr.invars[len(leaves):]) | set(jaxpr.constvars)
    uses, unsupported = _match(jaxpr, kernels, biases, data)
    recorder = _Recorder(SOURCE)
    for keys, why in unsupported.items():
        if not skip_unsupported:
            raise Unsupported(
                f"{SOURCE}: layer {paths_lib.display_path(keys)!r}: its kernel is {why}. Pass "
                f"skip_unsupported=True to leave the layer out of the activations; its params "
                f"then pass through scale_by_rngd unchanged when not named in `layers`."
            )
        recorder.dropped.add(keys)
    uses = [u for u in uses if u.keys not in unsupported]
    _check_not_nested({u.keys for u in uses})

    extra = [v for u in uses for v in (u.x, u.z)]
    n_out = len(jaxpr.outvars)
    new_jaxpr = jaxpr.replace(outvars=list(jaxpr.outvars) + extra)
    new_closed = new_jaxpr if jaxpr is closed else closed.replace(jaxpr=new_jaxpr)
    values = jex.jaxpr_as_fun(new_closed)(*jax.tree.leaves(params), *dyn_values)
    output = jax.tree.unflatten(jax.tree.structure(out_shape), values[:n_out])
    for i, use in enumerate(uses):
        x, z = values[n_out + 2 * i], values[n_out + 2 * i + 1]
        x = jnp.moveaxis(x, use.axis, -1)
        z = jnp.moveaxis(jnp.transpose(z, np.argsort(use.perm)), use.m_axis, -1)
        if z.ndim == 1:  # one sample, x of shape (d_in,): one row
            x, z = x[None], z[None]
        recorder.add(use.keys, x, z)
    return output, recorder.tree()

