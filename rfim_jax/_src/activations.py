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
=========  =================================================  =====================================

For the Gaussian models the Fisher information of z is f'(z)^2 / sigma^2, which gives the
closed forms of the paper once f is written out.  Each activation object carries the mean
function ``f``, its derivative ``df`` (used by the two-layer metric of eq. 26, see
:func:`rfim_jax.two_layer_rfim`) and ``nu``.

Activation objects are frozen dataclasses: hashable, so they can be static arguments of
``jax.jit`` and keys of layer maps, and validated on construction.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Response = Literal["bernoulli_pm1", "bernoulli", "gaussian"]


def _check_sigma(name: str, sigma: float) -> float:
    sigma = float(sigma)
    if not sigma > 0.0:
        raise ValueError(f"{name}: sigma must be > 0, got sigma={sigma}.")
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
            return self.omega * jnp.logaddexp(self.iota * z / self.omega, z / self.omega)
        return jnp.where(z > 0, z, self.iota * z)

    def df(self, z):
        if self.omega > 0.0:
            return self.iota + (1.0 - self.iota) * jax.nn.sigmoid(
                (1.0 - self.iota) * z / self.omega
            )
        return jnp.where(z > 0, jnp.ones_like(z), jnp.full_like(z, self.iota))

    def nu(self, z):
        return self.df(z) ** 2 / self.sigma**2


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


@dataclasses.dataclass(frozen=True)
class Linear(Activation):
    """Linear neuron with Gaussian response y ~ N(z, sigma^2); nu = 1/sigma^2 (eq. 22)."""

    sigma: float = 1.0
    name = "linear"
    response = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma("Linear", self.sigma))

    def f(self, z):
        return z

    def df(self, z):
        return jnp.ones_like(z)

    def nu(self, z):
        return jnp.full_like(z, 1.0 / self.sigma**2)


ActivationLike = str | Activation

_BY_NAME = {
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "relu": ReLU,
    "elu": ELU,
    "linear": Linear,
}

ACTIVATION_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get_activation(activation: ActivationLike) -> Activation:
    """Resolves an activation name or object to an :class:`Activation` object.

    Names are ``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"elu"`` and ``"linear"``; a name gives
    the activation with its default parameters (``ReLU(omega=1, iota=0, sigma=1)``,
    ``ELU(alpha=1, sigma=1)``, ``Linear(sigma=1)``).

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
