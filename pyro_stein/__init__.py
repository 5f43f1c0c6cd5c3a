"""pyro_stein: amortized Stein variational inference for Pyro."""

from .kernels import IMQKernel, RadialKernel, RBFKernel
from .stein import ksd, stein_direction

__version__ = "0.1.0"

__all__ = [
    "IMQKernel",
    "RBFKernel",
    "RadialKernel",
    "__version__",
    "ksd",
    "stein_direction",
]
