"""Activations, their stochastic response models and their Fisher coefficients.

Every RFIM of a single neuron has the common form of eq. (21),

    g^y(w | x) = nu_f(w~^T x~) x~ x~^T,

where the coefficient nu_f depends on the activation f and on the response model
that makes the neuron's output stochastic (paper Sec. 3.1, appendices A-E):

=========  =================================================  =====================================
activation response model                                     nu_f(z)
=========  =================================================  =====================================
tanh       y in {-1, 1}, p(y = 1) = (1 + tanh z) / 2           1 - tanh^2 z                 (eq. 12)
sigmoid    y in {0, 1},  p(y = 1) = s(z)                       s(z) (1 - s(z))              (eq. 14)
relu       y ~ N(relu_omega(z), sigma^2)                       f'(z)^2 / sigma^2     (eqs. 16-18,41)
elu        y ~ N(elu(z), sigma^2)                              f'(z)^2 / sigma^2            (eq. 20)
linear     y ~ N(z, sigma^2)                                   1 / sigma^2                  (eq. 22)
gelu       y ~ N(z Phi(z), sigma^2)                            (Phi(z) + z phi(z))^2 / sigma^2
gelu_tanh  y ~ N(z s(2u), sigma^2), u = c(z + 0.044715 z^3)    f'(z)^2 / sigma^2 (see GELUTanh)
silu       y ~ N(z s(z), sigma^2)                              s(z)^2 (1 + z s(-z))^2 / sigma^2
softplus   y ~ N(ln(1 + e^z), sigma^2)                         s(z)^2 / sigma^2
=========  =================================================  =====================================

Phi and phi are the standard normal CDF and density, c = sqrt(2/pi).  For the Gaussian models
the Fisher information of z is f'(z)^2 / sigma^2, which gives the closed forms of the paper
once f is written out.  Each activation object carries the mean function ``f``, its derivative
``df`` (used by the two-layer metric of eq. 26, see :func:`rfim_jax.two_layer_rfim`) and ``nu``.

Activation objects are frozen dataclasses: hashable, so they can be static arguments of
``jax.jit`` and keys of layer maps, and validated on construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np

Response = Literal["bernoulli_pm1", "bernoulli", "gaussian"]


#: The range of sigma whose 1/sigma^2 is a normal float32 (see _check_sigma).
_SIGMA_MIN = float(np.sqrt(np.finfo(np.float32).tiny))
_SIGMA_MAX = float(np.sqrt(np.finfo(np.float32).max))


def _check_sigma(name: str, sigma: float) -> float:
    if isinstance(sigma, jax.core.Tracer):
        return sigma  # traced (a jitted sweep over sigma): checked where it is concrete
    sigma = float(sigma)
    if not sigma > 0.0:
        raise ValueError(f"{name}: sigma must be > 0, got sigma={sigma}.")
    # nu divides by sigma^2, computed in the inputs' dtype (float32 at least): it must be a
    # normal float32 there, or nu is inf (or 0 for an infinite sigma) for every z.
    if not _SIGMA_MIN <= sigma <= _SIGMA_MAX:
        raise ValueError(
            f"{name}: sigma={sigma} puts 1/sigma^2 outside float32's range, so every nu would "
            f"be inf or 0; use a sigma in [{_SIGMA_MIN:.3g}, {_SIGMA_MAX:.3g}] (the metric "
            f"scales as 1/sigma^2: rescale the loss instead)."
        )
    return sigma


class Activation:
    """Base class of an element-wise activation with a stochastic response model.

    Subclasses define ``f`` (the mean of the response), ``df`` (its derivative) and
    ``nu`` (the Fisher information of the pre-activation z under the response model).
    ``response`` names the model: ``"bernoulli_pm1"`` (y in {-1, 1}, mean f(z)),
    ``"bernoulli"`` (y in {0, 1}, mean f(z)) or ``"gaussian"`` (y ~ N(f(z), sigma^2)).
    """

    name: str = "activation"
    response: Response = "gaussian"

    def f(self, z: jax.Array) -> jax.Array:
        raise NotImplementedError

    def df(self, z: jax.Array) -> jax.Array:
        raise NotImplementedError

    def nu(self, z: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.f(z)


@dataclasses.dataclass(frozen=True)
class Tanh(Activation):
    """tanh neuron with y in {-1, 1}, p(y = 1) = (1 + tanh z)/2; nu = 1 - tanh^2 z (eq. 12)."""

    name = "tanh"
    response = "bernoulli_pm1"

    def f(self, z):
        return jnp.tanh(z)

    def df(self, z):
        # 1 - tanh^2 z = 4 s(2z) s(-2z); the product form keeps its tiny tail instead of
        # rounding to exactly 0 once |z| is large, so saturated neurons keep a positive metric.
        return 4.0 * jax.nn.sigmoid(2.0 * z) * jax.nn.sigmoid(-2.0 * z)

    def nu(self, z):
        return self.df(z)


@dataclasses.dataclass(frozen=True)
class Sigmoid(Activation):
    """sigmoid neuron with y in {0, 1}, p(y = 1) = s(z); nu = s(z)(1 - s(z)) (eq. 14)."""

    name = "sigmoid"
    response = "bernoulli"

    def f(self, z):
        return jax.nn.sigmoid(z)

    def df(self, z):
        # s(z)(1 - s(z)) written as s(z) s(-z): no cancellation in 1 - s(z) for large z.
        return jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)

    def nu(self, z):
        return self.df(z)


@dataclasses.dataclass(frozen=True)
class ReLU(Activation):
    """Leaky/smoothed ReLU neuron with Gaussian response (eqs. 15-18, 41).

    With ``omega > 0`` the mean is the smoothed PReLU

        relu_omega(z) = omega * ln(exp(iota z / omega) + exp(z / omega)),

    whose derivative is ``iota + (1 - iota) s((1 - iota) z / omega)``, so

        nu(z) = [iota + (1 - iota) s((1 - iota) z / omega)]^2 / sigma^2.       (eq. 18)

    With ``omega = 0`` it is the hard PReLU ``max(z, iota z)`` of eq. (16):
    ``nu = 1/sigma^2`` for z > 0 and ``iota^2/sigma^2`` for z < 0.  At exactly z = 0 we
    take the left branch (f'(0) = iota), matching ``jax.nn.relu``'s gradient at 0.

    Defaults ``omega=1, iota=0, sigma=1`` are the paper's MLP experiment, nu = s(z)^2.
    """

    omega: float = 1.0
    iota: float = 0.0
    sigma: float = 1.0
    name = "relu"
    response = "gaussian"

    def __post_init__(self):
        omega, iota = float(self.omega), float(self.iota)
        if not omega >= 0.0:
            raise ValueError(f"ReLU: omega must be >= 0, got omega={omega}.")
        if not 0.0 <= iota < 1.0:
            raise ValueError(f"ReLU: iota must lie in [0, 1), got iota={iota}.")
        object.__setattr__(self, "omega", omega)
        object.__setattr__(self, "iota", iota)
        object.__setattr__(self, "sigma", _check_sigma("ReLU", self.sigma))

    def f(self, z):
        if self.omega > 0.0:
            return _smooth_prelu(z, self.omega, self.iota)
        return jnp.where(z > 0, z, self.iota * z)

    def df(self, z):
        if self.omega > 0.0:
            return _smooth_prelu_derivative(z, self.omega, self.iota)
        return jnp.where(z > 0, jnp.ones_like(z), jnp.full_like(z, self.iota))

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


def _smooth_prelu_derivative(z, omega: float, iota: float):
    """``iota + (1 - iota) s((1 - iota) z / omega)``, the derivative of eq. (41)."""
    return iota + (1.0 - iota) * jax.nn.sigmoid((1.0 - iota) * z / omega)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _smooth_prelu(z, omega: float, iota: float):
    """``omega logaddexp(iota z / omega, z / omega)`` (eq. 41), with its exact derivative.

    Written as ``max(z, iota z) + omega log1p(exp(-(1 - iota)|z| / omega))`` so that
    nothing is divided by omega before the exponential (``z / omega`` overflows for a small
    omega).  Autodiff of that form is wrong at z = 0 (``max``'s tie and ``|z|``'s kink give
    ``iota`` instead of ``(1 + iota)/2``), hence the custom derivative.
    """
    gap = (1.0 - iota) * jnp.abs(z)
    return jnp.maximum(z, iota * z) + omega * jnp.log1p(jnp.exp(-gap / omega))


@_smooth_prelu.defjvp
def _smooth_prelu_jvp(omega, iota, primals, tangents):
    (z,), (dz,) = primals, tangents
    return _smooth_prelu(z, omega, iota), _smooth_prelu_derivative(z, omega, iota) * dz


@dataclasses.dataclass(frozen=True)
class ELU(Activation):
    """ELU neuron with Gaussian response (eq. 19-20).

    ``f(z) = z`` for z >= 0 and ``alpha (exp(z) - 1)`` for z < 0, so
    ``nu = 1/sigma^2`` for z >= 0 and ``alpha^2 exp(2 z)/sigma^2`` for z < 0.
    """

    alpha: float = 1.0
    sigma: float = 1.0
    name = "elu"
    response = "gaussian"

    def __post_init__(self):
        alpha = float(self.alpha)
        if not alpha > 0.0:
            raise ValueError(f"ELU: alpha must be > 0, got alpha={alpha}.")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "sigma", _check_sigma("ELU", self.sigma))

    def f(self, z):
        # expm1 of the clipped argument keeps the unused branch finite for large z.
        return jnp.where(z >= 0, z, self.alpha * jnp.expm1(jnp.minimum(z, 0.0)))

    def df(self, z):
        return jnp.where(z >= 0, jnp.ones_like(z), self.alpha * jnp.exp(jnp.minimum(z, 0.0)))

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_A = 0.044715
# Beyond |z| = 1e3 the tanh-GELU's gate s(2u) is exactly 0 or 1 in float64 (already from
# |z| ~ 30), so clipping z inside the gate changes no value but keeps z^3 and z^2 finite.
_GELU_TANH_CLIP = 1e3


@dataclasses.dataclass(frozen=True)
class GELU(Activation):
    """GELU neuron (erf form) with Gaussian response y ~ N(gelu(z), sigma^2).

    ``f(z) = z Phi(z)`` with Phi the standard normal CDF and phi its density, so

        f'(z) = Phi(z) + z phi(z),     nu(z) = (Phi(z) + z phi(z))^2 / sigma^2.

    Phi is evaluated with ``jax.scipy.special.ndtr``, accurate in both tails; f and f' are
    finite for every finite z in float32 and float64 (f -> 0, f' -> 0 as z -> -inf).
    """

    sigma: float = 1.0
    name = "gelu"
    response = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma("GELU", self.sigma))

    def f(self, z):
        return z * jax.scipy.special.ndtr(z)

    def df(self, z):
        return jax.scipy.special.ndtr(z) + z * (_INV_SQRT_2PI * jnp.exp(-0.5 * z * z))

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


@dataclasses.dataclass(frozen=True)
class GELUTanh(Activation):
    """GELU neuron, tanh approximation, with Gaussian response y ~ N(f(z), sigma^2).

    ``f(z) = z (1 + tanh u)/2 = z s(2u)`` with ``u = sqrt(2/pi) (z + 0.044715 z^3)``
    (``jax.nn.gelu(z, approximate=True)``).  Its exact derivative is

        f'(z) = s(2u) + z (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 z^2) / 2,

    with ``(1 - tanh^2 u)/2 = 2 s(2u) s(-2u)``, and ``nu(z) = f'(z)^2 / sigma^2``.  The product
    form has no cancellation in ``1 + tanh u`` for negative z.
    """

    sigma: float = 1.0
    name = "gelu_tanh"
    response = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma("GELUTanh", self.sigma))

    @staticmethod
    def _gate(z):
        t = jnp.clip(z, -_GELU_TANH_CLIP, _GELU_TANH_CLIP)
        two_u = 2.0 * _SQRT_2_OVER_PI * (t + _GELU_TANH_A * t * t * t)
        return t, two_u

    def f(self, z):
        _, two_u = self._gate(z)
        return z * jax.nn.sigmoid(two_u)

    def df(self, z):
        t, two_u = self._gate(z)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * t * t)
        # z is clipped too: the term is exactly 0 in float64 once |z| > ~30.
        return jax.nn.sigmoid(two_u) + 2.0 * t * jax.nn.sigmoid(two_u) * jax.nn.sigmoid(
            -two_u
        ) * du

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


@dataclasses.dataclass(frozen=True)
class SiLU(Activation):
    """SiLU (swish) neuron with Gaussian response y ~ N(z s(z), sigma^2).

    ``f(z) = z s(z)``, ``f'(z) = s(z) (1 + z (1 - s(z)))`` and ``nu(z) = f'(z)^2 / sigma^2``.
    ``1 - s(z)`` is computed as ``s(-z)`` (no cancellation for large z), and ``jax.nn.sigmoid``
    saturates to exactly 0 or 1 without overflow, so f and f' are finite for every finite z.
    """

    sigma: float = 1.0
    name = "silu"
    response = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma("SiLU", self.sigma))

    def f(self, z):
        return z * jax.nn.sigmoid(z)

    def df(self, z):
        return jax.nn.sigmoid(z) * (1.0 + z * jax.nn.sigmoid(-z))

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


@dataclasses.dataclass(frozen=True)
class Softplus(Activation):
    """Softplus neuron with Gaussian response y ~ N(ln(1 + e^z), sigma^2).

    ``f(z) = ln(1 + e^z)``, ``f'(z) = s(z)`` and ``nu(z) = s(z)^2 / sigma^2``.  This is the
    smoothed ReLU ``ReLU(omega=1, iota=0, sigma)`` under another name; f is computed as
    ``logaddexp(z, 0)``, which neither overflows nor loses the tail for negative z.
    """

    sigma: float = 1.0
    name = "softplus"
    response = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma("Softplus", self.sigma))

    def f(self, z):
        return jnp.logaddexp(z, 0.0)

    def df(self, z):
        return jax.nn.sigmoid(z)

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


@dataclasses.dataclass(frozen=True)
class Linear(Activation):
    """Linear neuron with Gaussian response y ~ N(z, sigma^2); nu = 1/sigma^2 (eq. 22).

    All of a linear layer's neurons share one block, ``A = mean x~ x~^T / sigma^2`` (eq. 22),
    so the optimiser stores a single (d, d) block for the layer.  ``per_neuron=True`` stores
    the same metric as one block per neuron (m d^2 numbers, like an activation kind): that
    is what a grouped or depthwise convolution needs, whose output channels see only their
    group's patches, so that each group has its own A.  In the diagonal representation the
    two agree too; in the eigen one a per-neuron Linear is read like an activation kind
    (per-neuron scales in the basis of A), where the shared one is exact (SPEC §7).

    Args:
      sigma: the response's standard deviation, > 0.
      per_neuron: store one block per neuron instead of one shared block.

    Raises:
      ValueError: for sigma <= 0 or a non-bool ``per_neuron``.
    """

    sigma: float = 1.0
    per_neuron: bool = False
    name = "linear"
    response = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma("Linear", self.sigma))
        if not isinstance(self.per_neuron, bool):
            raise ValueError(
                f"Linear: per_neuron must be True or False, got {self.per_neuron!r}."
            )

    def f(self, z):
        return z

    def df(self, z):
        return jnp.ones_like(z)

    def nu(self, z):
        return jnp.full_like(z, 1.0 / self.sigma**2)


def is_shared_linear(kind) -> bool:
    """Whether ``kind`` is the linear kind with one block shared by all neurons (eq. 22)."""
    return isinstance(kind, Linear) and not kind.per_neuron


ActivationLike = str | Activation

_BY_NAME = {
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "relu": ReLU,
    "elu": ELU,
    "linear": Linear,
    "gelu": GELU,
    "gelu_tanh": GELUTanh,
    "silu": SiLU,
    "softplus": Softplus,
}

ACTIVATION_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get_activation(activation: ActivationLike) -> Activation:
    """Resolves an activation name or object to an :class:`Activation` object.

    Names are ``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"elu"``, ``"linear"``, ``"gelu"``,
    ``"gelu_tanh"``, ``"silu"`` and ``"softplus"``; a name gives the activation with its default
    parameters (``ReLU(omega=1, iota=0, sigma=1)``, ``ELU(alpha=1, sigma=1)``, ``sigma=1`` for
    the others).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
      TypeError: for anything that is neither a string nor an ``Activation``.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _BY_NAME:
            raise ValueError(
                f"Unknown activation {activation!r}; valid names are "
                f"{', '.join(repr(n) for n in ACTIVATION_NAMES)}."
            )
        return _BY_NAME[key]()
    raise TypeError(
        f"An activation must be a name ({', '.join(ACTIVATION_NAMES)}) or an "
        f"rfim_jax.Activation object, got {type(activation).__name__}: {activation!r}."
    )
