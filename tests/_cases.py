"""Parameter cases shared by the test modules: every activation and setting in SPEC §3, and the
Gaussian-response activations of SPEC §8 (gelu, gelu_tanh, silu, softplus)."""

from rfim_jax import ELU, GELU, GELUTanh, Linear, ReLU, Sigmoid, SiLU, Softplus, Tanh

ACTIVATIONS = [
    Sigmoid(),
    Tanh(),
    ReLU(),
    ReLU(omega=0.5, iota=0.1, sigma=0.7),
    ReLU(omega=2.0, iota=0.3, sigma=1.5),
    ReLU(omega=0.0),
    ReLU(omega=0.0, iota=0.2, sigma=0.5),
    ELU(),
    ELU(alpha=0.5, sigma=2.0),
    Linear(),
    Linear(sigma=0.3),
    GELU(),
    GELU(sigma=0.6),
    GELUTanh(),
    GELUTanh(sigma=1.7),
    SiLU(),
    SiLU(sigma=0.4),
    Softplus(),
    Softplus(sigma=2.5),
]
