"""The optimisers RNGD is compared with, one module each.

Every peer module defines:

- ``FAMILY``: the :class:`benchmarks.harness.Method` family it serves;
- ``DISTRIBUTION``: the package-registry distribution it needs (None when it ships with
  optax or with this repository);
- ``load()``: imports the peer, applying any documented compatibility shim, and returns the
  module; it raises when the peer cannot be used;
- ``describe(method)``: a one-line description;

and either ``make_optimizer(method, sizes)`` (an optax transformation, scanned by the harness
like Adam; an optional ``extra_args(params, activations, logits, key)`` gives its update's
extra keyword arguments) or ``make_trainer(...)`` (a :class:`benchmarks.harness.Trainer` for a
peer with its own step function).

The peer packages are optional (``pip install kfac-jax psgd-jax``): importing this package or
any peer module never imports them; :func:`availability` says whether a peer runs here, with
its version, or why not.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from types import ModuleType

#: family -> module implementing it.
MODULES = {
    "kfac_ref": "benchmarks.peers.kfac_ref",
    "kfac_jax": "benchmarks.peers.kfac_jax",
    "psgd_kron": "benchmarks.peers.psgd",
    "muon": "benchmarks.peers.muon",
}
FAMILIES = tuple(MODULES)
#: the registry distributions of the peers, for version reports.
DISTRIBUTIONS = ("kfac-jax", "psgd-jax", "immutabledict")


def get(family: str) -> ModuleType:
    """The peer module of ``family``.

    Raises:
      KeyError: for a family that is not a peer.
    """
    return importlib.import_module(MODULES[family])


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a peer runs here.

    Attributes:
      family: the peer's family.
      available: whether :func:`load` succeeded.
      version: the installed distribution's version (None when not installed or built in).
      reason: why it is unavailable (None when available).
      shims: the compatibility shims that were applied.
    """

    family: str
    available: bool
    version: str | None
    reason: str | None = None
    shims: tuple[str, ...] = ()


def distribution_version(name: str | None) -> str | None:
    """The installed version of distribution ``name``, None when absent (or ``name`` None)."""
    if name is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def availability(family: str) -> Availability:
    """Tries to load the peer of ``family``; never raises."""
    module = get(family)
    version = distribution_version(module.DISTRIBUTION)
    try:
        module.load()
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        return Availability(family, False, version, f"{type(e).__name__}: {e}")
    return Availability(family, True, version, None, tuple(getattr(module, "SHIMS_APPLIED", ())))
