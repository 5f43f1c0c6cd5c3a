"""pyro_stein: amortized Stein variational inference for Pyro.

Wang & Liu (2016), "Learning to Draw Samples": a neural sampler trained with the Stein
variational gradient, as a Pyro guide (:class:`AmortizedSteinGuide`) with an Infer-style driver
(:class:`AmortizedSVGD`), amortized across datasets, and SteinGAN (:mod:`pyro_stein.ebm`) with a GAN baseline
(:mod:`pyro_stein.gan`).
"""

from ._io import CheckpointError
from .amortization import Amortization
from .data import Dataset, PriorPredictiveStream
from .ebm import AmortizedMLE, ContrastiveDivergence, GaussianBernoulliRBM
from .gan import GAN
from .graphs import RecordedGraphWarning
from .guide import AmortizedSteinGuide, ModelParameterWarning
from .infer import AmortizedSVGD, KernelWarning, NonFiniteDatasetWarning, NonFiniteUpdateError, refine
from .kernels import IMQKernel, RadialKernel, RBFKernel
from .laplace import LaplaceFrameWarning
from .logjoint import NonFiniteLogJointError
from .postprocess import HMC, MALA, MomentCorrection
from .stein import ksd, stein_direction

__version__ = "0.1.0"

__all__ = [
    "Amortization",
    "AmortizedMLE",
    "AmortizedSVGD",
    "AmortizedSteinGuide",
    "CheckpointError",
    "ContrastiveDivergence",
    "Dataset",
    "GAN",
    "GaussianBernoulliRBM",
    "HMC",
    "IMQKernel",
    "KernelWarning",
    "LaplaceFrameWarning",
    "MALA",
    "ModelParameterWarning",
    "MomentCorrection",
    "NonFiniteDatasetWarning",
    "NonFiniteLogJointError",
    "NonFiniteUpdateError",
    "PriorPredictiveStream",
    "RBFKernel",
    "RadialKernel",
    "RecordedGraphWarning",
    "__version__",
    "ksd",
    "refine",
    "stein_direction",
]
