"""Amortized MLE for energy-based models: SteinGAN (Wang & Liu, 2016, Algorithm 2).

An energy-based model ``p_theta(x) = exp(-E_theta(x)) / Z(theta)`` is fitted by maximum
likelihood. The log-likelihood gradient

.. math::

    \\nabla_\\theta \\log p_\\theta = \\mathbb{E}_{data}[-\\nabla_\\theta E_\\theta(x)]
        - \\mathbb{E}_{p_\\theta}[-\\nabla_\\theta E_\\theta(\\tilde x)]

needs draws from the model. SteinGAN trains a *sampler* ``x = f_eta(xi)`` (noise ``xi``) to
draw them, by amortized SVGD: with ``z_i = f_eta(xi_i)`` and the Stein direction
``phi(z_i) = 1/m sum_j k(z_j, z_i) s(z_j) + grad_{z_j} k(z_j, z_i)`` for the score
``s = -grad_x E_theta``, ``eta`` moves so that ``f_eta(xi_i)`` follows ``phi``; i.e. it
minimises ``-(1/n) sum_i f_eta(xi_i) . stop_grad(phi_i)``. :class:`AmortizedMLE` alternates
the two updates. The kernel's repulsive term ``grad_{z_j} k`` keeps the samples diverse;
``repulsive=False`` drops it (the paper's ablation: the sampler then collapses towards the
modes of the energy and the contrastive gradient is biased).

**Kernel on a feature map.** With ``feature_fn = h`` the kernel is ``k(x, y) = k_h(h(x), h(y))``
for a radial ``k_h`` (the paper uses the energy's encoder features). By the chain rule

.. math::

    \\nabla_{x_j} k(x_j, x_i) = J_h(x_j)^\\top \\nabla_1 k_h(h_j, h_i)
        = 2\\, \\partial_{r^2} k_h\\!\\left(h_j, h_i\\right) J_h(x_j)^\\top (h_j - h_i),

so the repulsive term at ``x_i`` is ``R_i = 2 sum_j g_ij J_j^T h_j - 2 sum_f h_{if} sum_j g_ij
J_j^T e_f`` (``g = dk/dr^2``, ``J_j = J_h(x_j)``, ``e_f`` the unit vectors of feature space).
Both sums need only the ``F + 1`` vector-Jacobian products ``J_j^T h_j`` and ``J_j^T e_f``
(computed in one backward pass through ``h`` on an ``(F + 1) n`` batch), then ``n x n``
matrix products: memory ``O((F + 1) n D)``, never ``n x n x D``. See
:func:`feature_stein_direction`.

**Class-conditional models** (the paper's joint model ``p(x, y)``): a sampler
``f_eta(xi, y)`` and an energy ``E_theta(x, y)``. The particles of different labels target
different conditionals ``p(x | y)``, so the kernel is block-diagonal: particles interact only
with particles of the same label.

Shipped modules: :class:`GaussianBernoulliRBM` (exact ``log Z`` by enumerating the hidden
states, so exact test log-likelihoods), :class:`AutoencoderEnergy` (a small convolutional
autoencoder energy for 8x8 images as in the paper), :class:`MLPEnergy` (toy problems) and
:class:`MLPSampler`; :class:`ContrastiveDivergence` (CD-k / persistent CD) is the baseline;
:func:`sample_toy_2d` draws 2-D toy data sets.

Example::

    energy = MLPEnergy(2)
    sampler = MLPSampler(noise_dim=4, data_dim=2)
    driver = AmortizedMLE(energy, sampler,
                          torch.optim.Adam(energy.parameters(), 1e-3, betas=(0.5, 0.9)),
                          torch.optim.Adam(sampler.parameters(), 1e-3, betas=(0.5, 0.9)),
                          noise_dim=4)
    history = driver.run(sample_toy_2d("mixture", 2000), num_steps=2000, batch_size=128)
    x = driver.sample(500)

References:

[1] D. Wang, Q. Liu, "Learning to Draw Samples: With Application to Amortized MLE for
    Generative Adversarial Learning", arXiv:1611.01722, 2016.
[2] Q. Liu, D. Wang, "Stein Variational Gradient Descent", NeurIPS 2016.
[3] G. Hinton, "Training Products of Experts by Minimizing Contrastive Divergence", Neural
    Computation 14, 2002; T. Tieleman, "Training Restricted Boltzmann Machines using
    Approximations to the Likelihood Gradient", ICML 2008 (persistent CD).
[4] K. Cho, A. Ilin, T. Raiko, "Improved Learning of Gaussian-Bernoulli Restricted Boltzmann
    Machines", ICANN 2011.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import _int_at_least
from .kernels import RadialKernel, RBFKernel
from .stein import ksd_from_matrices, stein_direction_from_matrices

__all__ = [
    "AmortizedMLE",
    "AutoencoderEnergy",
    "ContrastiveDivergence",
    "GaussianBernoulliRBM",
    "MLPEnergy",
    "MLPSampler",
    "feature_stein_direction",
    "sample_toy_2d",
]

_MAX_EXACT_HIDDEN = 20


# --------------------------------------------------------------------------------------
# Stein directions
# --------------------------------------------------------------------------------------


def _interaction_mask(n: int, labels: Tensor | None, leave_one_out: bool, like: Tensor) -> Tensor | None:
    """``(n, n)`` 0/1 mask of interacting pairs, or ``None`` when every pair interacts."""
    mask = None
    if labels is not None:
        mask = (labels.unsqueeze(-1) == labels.unsqueeze(-2)).to(like.dtype)
    if leave_one_out:
        off = 1.0 - torch.eye(n, dtype=like.dtype, device=like.device)
        mask = off if mask is None else mask * off
    return mask


def _direction(z: Tensor, score: Tensor, k: Tensor, mask: Tensor | None, repulse: Tensor | None) -> Tensor:
    """``(sum_j mask_ij k_ij s_j + repulse_i) / m_i`` with ``m_i = sum_j mask_ij`` (at least 1)."""
    if mask is not None:
        k = k * mask
        m = mask.sum(-1, keepdim=True).clamp_min(1.0)
    else:
        m = float(z.shape[-2])
    out = k @ score
    if repulse is not None:
        out = out + repulse
    return out / m


def feature_stein_direction(
    x: Tensor,
    score: Tensor,
    feature_fn: Callable[[Tensor], Tensor] | None,
    kernel: RadialKernel,
    leave_one_out: bool = True,
    repulsive: bool = True,
    labels: Tensor | None = None,
) -> Tensor:
    """The SVGD direction with the kernel ``k(x, y) = k_h(h(x), h(y))`` on a feature map ``h``.

    ``phi(x_i) = 1/m_i sum_j [k(x_j, x_i) s_j + grad_{x_j} k(x_j, x_i)]`` over the pairs that
    interact (``j != i`` for leave-one-out; same label when ``labels`` is given). The repulsive
    term uses the chain rule ``grad_{x_j} k = J_h(x_j)^T grad_1 k_h`` (see the module docstring)
    through ``F + 1`` vector-Jacobian products, without ``n x n x D`` tensors.

    :param Tensor x: particles, shape ``(n, *event_shape)`` (treated as constants).
    :param Tensor score: ``grad_x log p`` at the particles, same shape.
    :param feature_fn: per-example map ``(n, *event_shape) -> (n, F)``, differentiable in ``x``;
        ``None`` for the identity (the kernel on the flattened sample space).
    :param RadialKernel kernel: the kernel ``k_h`` (its bandwidth rule sees the features).
    :param bool leave_one_out: drop the ``j = i`` term (right for fresh i.i.d. draws).
    :param bool repulsive: include the repulsive term ``grad_{x_j} k``.
    :param labels: optional ``(n,)`` labels; particles only interact within a label.
    :returns: directions of shape ``x.shape``.

    Example::

        phi = feature_stein_direction(x, -grad_energy, energy.features, RBFKernel())
    """
    if score.shape != x.shape:
        raise ValueError(f"score shape {tuple(score.shape)} must equal particle shape {tuple(x.shape)}")
    n = x.shape[0]
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (n,)):
        raise ValueError(
            f"labels must be a Tensor of shape ({n},), one label per particle, got "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    x = x.detach()
    s = score.detach().reshape(n, -1)
    mask = _interaction_mask(n, labels, leave_one_out, x)
    if feature_fn is None:
        z = x.reshape(n, -1)
        km = kernel.matrices(z)
        if repulsive and labels is None:
            return stein_direction_from_matrices(z, s, km, leave_one_out).reshape(x.shape)
        repulse = None
        if repulsive:
            g = km.dk if mask is None else km.dk * mask
            repulse = 2.0 * (g @ z - z * g.sum(-1, keepdim=True))
        return _direction(z, s, km.k, mask, repulse).reshape(x.shape)

    with torch.no_grad():
        h = feature_fn(x)
    if h.dim() != 2 or h.shape[0] != n:
        raise ValueError(
            f"feature_fn must map {n} particles to a (n, F) = ({n}, F) feature matrix, got shape "
            f"{tuple(h.shape)}; flatten the features, e.g. feature_fn=lambda x: enc(x).flatten(1)"
        )
    km = kernel.matrices(h)
    repulse = None
    if repulsive:
        nf = h.shape[1]
        g = km.dk if mask is None else km.dk * mask
        # one backward pass on (F + 1) stacked copies: cotangent h_j for copy 0, e_f for copy f + 1
        xr = x.unsqueeze(0).expand((nf + 1,) + tuple(x.shape)).reshape((nf + 1) * n, *x.shape[1:])
        xr = xr.clone().requires_grad_(True)
        with torch.enable_grad():
            hr = feature_fn(xr).reshape(nf + 1, n, nf)
        cot = torch.cat([h.unsqueeze(0), torch.eye(nf, dtype=h.dtype, device=h.device).unsqueeze(1).expand(nf, n, nf)])
        (vjp,) = torch.autograd.grad(hr, xr, grad_outputs=cot)
        vjp = vjp.reshape(nf + 1, n, -1)
        a, c = vjp[0], vjp[1:]  # a_j = J_j^T h_j ; c[f, j] = J_j^T e_f
        gc = g @ c  # (F, n, D): sum_j g_ij J_j^T e_f
        repulse = 2.0 * (g @ a - torch.einsum("if,fid->id", h, gc))
    return _direction(h, s, km.k, mask, repulse).reshape(x.shape)


# --------------------------------------------------------------------------------------
# Energies and samplers
# --------------------------------------------------------------------------------------


class GaussianBernoulliRBM(nn.Module):
    """Gaussian-Bernoulli RBM, with optional one-hot label units (a joint model of ``(x, y)``).

    Joint energy, with a fixed visible standard deviation ``sigma`` (a hyper-parameter, not
    learned; ``sigma = 1`` is the standard unit-variance parameterisation for standardized data):

    .. math::

        E(x, h, y) = \\frac{\\|x - b\\|^2}{2\\sigma^2} - c^\\top h - U_y^\\top h - d_y
            - \\frac{x^\\top W h}{\\sigma^2},

    ``h in {0, 1}^H``. Summing out ``h`` gives the free energy returned by :meth:`forward`:

    .. math::

        F(x, y) = \\frac{\\|x - b\\|^2}{2\\sigma^2} - d_y
            - \\sum_j \\mathrm{softplus}(c_j + U_{yj} + W_{:j}^\\top x / \\sigma^2).

    Given ``h`` (and ``y``), ``x ~ N(b + W h, sigma^2 I)``, so the visible integral is Gaussian and

    .. math::

        \\log Z = \\tfrac{D}{2} \\log(2\\pi\\sigma^2) + \\operatorname{logsumexp}_{h, y}
            \\Big[c^\\top h + U_y^\\top h + d_y + \\frac{\\|b + W h\\|^2 - \\|b\\|^2}{2\\sigma^2}\\Big],

    exact by enumerating the ``2^H`` hidden states (``H <= 20``).

    :param int num_visible: ``D``.
    :param int num_hidden: ``H``.
    :param float sigma: visible standard deviation (fixed).
    :param num_classes: number of labels ``K`` for the joint model, or ``None``.
    :param float init_scale: standard deviation of the initial weights ``W``.

    Example::

        rbm = GaussianBernoulliRBM(64, 16)
        nll = -rbm.log_likelihood(x_test).mean()
    """

    def __init__(
        self,
        num_visible: int,
        num_hidden: int,
        sigma: float = 1.0,
        num_classes: int | None = None,
        init_scale: float = 0.01,
    ):
        super().__init__()
        num_visible = _int_at_least(num_visible, "num_visible", 1, "a positive int")
        num_hidden = _int_at_least(num_hidden, "num_hidden", 1, "a positive int")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if num_classes is not None:
            num_classes = _int_at_least(num_classes, "num_classes", 1, "a positive int or None")
        self.num_visible = num_visible
        self.num_hidden = num_hidden
        self.sigma = float(sigma)
        self.num_classes = num_classes
        self.W = nn.Parameter(init_scale * torch.randn(num_visible, num_hidden))
        self.b = nn.Parameter(torch.zeros(num_visible))
        self.c = nn.Parameter(torch.zeros(num_hidden))
        if num_classes is not None:
            self.U = nn.Parameter(torch.zeros(num_classes, num_hidden))
            self.d = nn.Parameter(torch.zeros(num_classes))

    # -- energies ------------------------------------------------------------------------
    def _hidden_input(self, x: Tensor, y: Tensor | None) -> Tensor:
        pre = self.c + (x @ self.W) / self.sigma**2
        if y is not None:
            pre = pre + self.U[y]
        return pre

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Free energy ``F(x, y)``, shape ``(batch,)``; for a joint model with ``y=None`` the
        marginal ``F(x) = -logsumexp_y(-F(x, y))``."""
        if x.dim() != 2 or x.shape[-1] != self.num_visible:
            raise ValueError(f"x must have shape (batch, {self.num_visible}), got {tuple(x.shape)}")
        _check_labels(y, x.shape[0], "y")  # class indices: a bool tensor would select rows instead
        quad = (x - self.b).pow(2).sum(-1) / (2.0 * self.sigma**2)
        if self.num_classes is None:
            if y is not None:
                raise TypeError("labels y were given to an RBM without label units; build it with num_classes=K")
            return quad - F.softplus(self._hidden_input(x, None)).sum(-1)
        if y is None:
            pre = self.c + (x @ self.W) / self.sigma**2  # (batch, H)
            per_class = F.softplus(pre.unsqueeze(1) + self.U).sum(-1) + self.d  # (batch, K)
            return quad - torch.logsumexp(per_class, -1)
        return quad - self.d[y] - F.softplus(self._hidden_input(x, y)).sum(-1)

    free_energy = forward

    # -- exact enumeration ---------------------------------------------------------------
    def hidden_states(self) -> Tensor:
        """All ``2^H`` binary hidden configurations, shape ``(2^H, H)``, on the weights' device/dtype."""
        H = self.num_hidden
        if H > _MAX_EXACT_HIDDEN:
            raise ValueError(f"exact enumeration needs num_hidden <= {_MAX_EXACT_HIDDEN}, got {H} (2^{H} states)")
        idx = torch.arange(2**H, device=self.W.device)
        bits = (idx.unsqueeze(-1) >> torch.arange(H, device=self.W.device)) & 1
        return bits.to(self.W.dtype)

    def log_joint_hidden(self) -> Tensor:
        """Unnormalized ``log p(h, y)`` (``x`` integrated out) on every state, without the
        ``D/2 log(2 pi sigma^2)`` constant: shape ``(2^H,)``, or ``(K, 2^H)`` for a joint model."""
        h = self.hidden_states()
        mean = self.b + h @ self.W.T  # (2^H, D)
        quad = (mean.pow(2).sum(-1) - self.b.pow(2).sum()) / (2.0 * self.sigma**2)
        out = h @ self.c + quad
        if self.num_classes is not None:
            out = out + (self.U @ h.T) + self.d.unsqueeze(-1)
        return out

    def log_partition(self) -> Tensor:
        """Exact ``log Z`` (a scalar tensor, differentiable in the parameters)."""
        const = 0.5 * self.num_visible * math.log(2.0 * math.pi * self.sigma**2)
        return torch.logsumexp(self.log_joint_hidden().reshape(-1), 0) + const

    def log_likelihood(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact ``log p(x)`` (or ``log p(x, y)`` when labels are given), shape ``(batch,)``."""
        return -self.forward(x, y) - self.log_partition()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` exact draws from the model by enumeration: ``(h[, y]) ~ p(h[, y])`` over all ``2^H``
        hidden states, then ``x ~ N(b + W h, sigma^2 I)``. Returns ``x`` ``(n, D)``, or ``(x, y)`` for a
        joint model. No Markov chain, so no mixing error (the exact-gradient baseline of the CD drivers)."""
        n = _int_at_least(n, "n", 1, "a positive int")
        logits = self.log_joint_hidden()  # (2^H,) or (K, 2^H)
        idx = torch.multinomial(torch.softmax(logits.reshape(-1), 0), n, replacement=True)
        num_states = 2**self.num_hidden
        x = self.sample_visible(self.hidden_states()[idx % num_states])
        return x if self.num_classes is None else (x, idx // num_states)

    # -- Gibbs sampling (CD baselines) ---------------------------------------------------
    def sample_hidden(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``h ~ p(h | x[, y])``: independent Bernoulli(sigmoid(c + U_y + W^T x / sigma^2))."""
        return torch.bernoulli(torch.sigmoid(self._hidden_input(x, y)))

    def sample_visible(self, h: Tensor) -> Tensor:
        """``x ~ p(x | h) = N(b + W h, sigma^2 I)``."""
        mean = self.b + h @ self.W.T
        return mean + self.sigma * torch.randn_like(mean)

    def gibbs(self, x: Tensor, k: int = 1, y: Tensor | None = None) -> Tensor:
        """``k`` block-Gibbs sweeps ``x -> h -> x`` (labels, if any, clamped); no gradient."""
        with torch.no_grad():
            for _ in range(k):
                x = self.sample_visible(self.sample_hidden(x, y))
        return x


def _mlp(sizes: Sequence[int], act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _one_hot(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    if y.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        raise TypeError(f"labels must be an integer tensor, got dtype {y.dtype}")
    return F.one_hot(y.long(), num_classes).to(like.dtype)


class MLPEnergy(nn.Module):
    """A small MLP energy ``E(x[, y]) = MLP([x, onehot(y)]) + ||x||^2 / (2 s^2)``.

    The quadratic confinement (``s = confinement``; ``None`` to drop it) makes ``exp(-E)``
    integrable whatever the network does far from the data.

    :param int dim: data dimension.
    :param hidden: hidden layer widths.
    :param num_classes: number of labels for a conditional energy ``E(x, y)``, or ``None``.
    :param confinement: scale ``s`` of the quadratic term.

    Example::

        energy = MLPEnergy(2, hidden=(64, 64))
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        num_classes: int | None = None,
        confinement: float | None = 4.0,
    ):
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.confinement = confinement
        self.net = _mlp([dim + (num_classes or 0), *hidden, 1])

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        inp = x
        if self.num_classes is not None:
            if y is None:
                raise TypeError("this MLPEnergy is conditional (num_classes set): pass labels y")
            inp = torch.cat([x, _one_hot(y, self.num_classes, x)], -1)
        e = self.net(inp).squeeze(-1)
        if self.confinement is not None:
            e = e + x.pow(2).sum(-1) / (2.0 * self.confinement**2)
        return e


class AutoencoderEnergy(nn.Module):
    """A small convolutional autoencoder energy for images (8x8 by default), as in SteinGAN.

    ``E(x[, y]) = ||x - Dec(Enc(x))||^2 / (2 tau^2) + ||x||^2 / (2 s^2) - l_y(Enc(x))``, where
    ``l = Linear(Enc(x))`` are class logits for the joint model ``p(x, y)`` (``num_classes``
    set; with ``y=None`` the label is summed out: ``-logsumexp_y l_y``). The quadratic term
    (``s = confinement``) keeps ``exp(-E)`` integrable. :meth:`features` (the code ``Enc(x)``)
    is the natural ``feature_fn`` for the kernel.

    Encoder: conv3x3(C -> c) - ELU - conv4x4/2(c -> 2c) - ELU - linear(2c * (H/2)(W/2) -> code);
    the decoder mirrors it (a transposed conv). Inputs may be flat ``(batch, C*H*W)`` or
    ``(batch, C, H, W)``; the energy has shape ``(batch,)``.

    :param image_shape: ``(C, H, W)`` with even ``H`` and ``W``.
    :param int channels: ``c``.
    :param int code_dim: size of the code.
    :param num_classes: number of labels, or ``None``.
    :param float tau: reconstruction temperature.
    :param confinement: ``s`` (``None`` to drop the quadratic term).

    Example::

        energy = AutoencoderEnergy((1, 8, 8), channels=16, code_dim=16, num_classes=10)
        driver = AmortizedMLE(energy, sampler, opt_e, opt_s, noise_dim=16, feature_fn=energy.features)
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 8, 8),
        channels: int = 16,
        code_dim: int = 16,
        num_classes: int | None = None,
        tau: float = 1.0,
        confinement: float | None = 4.0,
    ):
        super().__init__()
        C, H, W = (int(s) for s in image_shape)
        if H % 2 or W % 2:
            raise ValueError(f"image_shape must have even height and width, got {tuple(image_shape)}")
        self.image_shape = (C, H, W)
        self.num_classes = num_classes
        self.tau = float(tau)
        self.confinement = confinement
        hw = (H // 2) * (W // 2)
        self.enc = nn.Sequential(
            nn.Conv2d(C, channels, 3, padding=1),
            nn.ELU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.ELU(),
            nn.Flatten(),
            nn.Linear(2 * channels * hw, code_dim),
        )
        self.dec = nn.Sequential(
            nn.Linear(code_dim, 2 * channels * hw),
            nn.ELU(),
            nn.Unflatten(1, (2 * channels, H // 2, W // 2)),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.ELU(),
            nn.Conv2d(channels, C, 3, padding=1),
        )
        self.classifier = nn.Linear(code_dim, num_classes) if num_classes is not None else None

    def _image(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.image_shape)

    def features(self, x: Tensor) -> Tensor:
        """The code ``Enc(x)``, shape ``(batch, code_dim)``."""
        return self.enc(self._image(x))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        img = self._image(x)
        code = self.enc(img)
        rec = self.dec(code)
        e = (img - rec).pow(2).flatten(1).sum(-1) / (2.0 * self.tau**2)
        if self.confinement is not None:
            e = e + img.pow(2).flatten(1).sum(-1) / (2.0 * self.confinement**2)
        if self.classifier is not None:
            logits = self.classifier(code)
            e = e - (
                torch.logsumexp(logits, -1) if y is None else logits.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
            )
        elif y is not None:
            raise TypeError("labels y were given to an AutoencoderEnergy without num_classes")
        return e


class MLPSampler(nn.Module):
    """A neural sampler ``x = f_eta(xi[, y])``: an MLP on ``[xi, onehot(y)]``.

    :param int noise_dim: dimension of the standard normal noise ``xi``.
    :param int data_dim: output dimension.
    :param hidden: hidden widths.
    :param num_classes: labels for a class-conditional sampler, or ``None``.

    Example::

        sampler = MLPSampler(16, 64, hidden=(128, 128), num_classes=10)
        x = sampler(torch.randn(10, 16), torch.arange(10))
    """

    def __init__(self, noise_dim: int, data_dim: int, hidden: Sequence[int] = (64, 64), num_classes: int | None = None):
        super().__init__()
        self.noise_dim = noise_dim
        self.data_dim = data_dim
        self.num_classes = num_classes
        self.net = _mlp([noise_dim + (num_classes or 0), *hidden, data_dim])

    def forward(self, noise: Tensor, labels: Tensor | None = None) -> Tensor:
        inp = noise
        if self.num_classes is not None:
            if labels is None:
                raise TypeError("this MLPSampler is class-conditional (num_classes set): pass labels")
            inp = torch.cat([noise, _one_hot(labels, self.num_classes, noise)], -1)
        elif labels is not None:
            raise TypeError("labels were given to an unconditional MLPSampler; build it with num_classes=K")
        return self.net(inp)


def sample_toy_2d(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` points of a 2-D toy distribution.

    * ``"mixture"``: 8 Gaussians (sd 0.2) with equal weights on the circle of radius 2;
    * ``"rings"``: two concentric rings of radii 1 and 2.5 (equal weights), radial sd 0.1.

    :param str name: ``"mixture"`` or ``"rings"``.
    :param int n: number of points.
    :param generator: a CPU generator for reproducibility.
    :returns: ``(n, 2)`` tensor of the given (or default) dtype, on ``device``.
    """
    dtype = dtype or torch.get_default_dtype()
    if name == "mixture":
        comp = torch.randint(8, (n,), generator=generator)
        ang = comp.to(dtype) * (2 * math.pi / 8)
        centers = 2.0 * torch.stack([ang.cos(), ang.sin()], -1)
        x = centers + 0.2 * torch.randn(n, 2, generator=generator, dtype=dtype)
    elif name == "rings":
        ring = torch.randint(2, (n,), generator=generator).to(dtype)
        radius = 1.0 + 1.5 * ring + 0.1 * torch.randn(n, generator=generator, dtype=dtype)
        ang = 2 * math.pi * torch.rand(n, generator=generator, dtype=dtype)
        x = torch.stack([radius * ang.cos(), radius * ang.sin()], -1)
    else:
        raise ValueError(f"unknown toy distribution {name!r}; expected 'mixture' or 'rings'")
    return x.to(device) if device is not None else x


# --------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------


def _takes_labels(module: nn.Module) -> bool:
    """Whether a module is class-conditional: its ``num_classes`` attribute if it has one,
    otherwise whether ``forward`` accepts a second positional argument."""
    if hasattr(module, "num_classes"):
        return module.num_classes is not None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def _check_labels(labels: Tensor | None, n: int, name: str = "labels") -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a tensor of integer class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor (class indices), got dtype {labels.dtype}; use labels.long()"
        )
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape (batch,) = ({n},), got {tuple(labels.shape)}")


def _one_per_example(out, x: Tensor, what: str, example: str = "") -> Tensor:
    """``out`` if it holds one number per row of ``x`` (shape ``(batch,)``), else a ``ValueError`` saying ``what``."""
    if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{what}, shape (batch,) = ({x.shape[0]},), got {shape}; if it returns (batch, 1), squeeze the last "
            f"dimension{example}"
        )
    return out


class _NeuralSampling:
    """What :class:`AmortizedMLE` and :class:`~pyro_stein.gan.GAN` share about their noise-to-data network (the
    SteinGAN *sampler*, the GAN *generator*): drawing from it, labels for a class-conditional one, and the checks of a
    data batch. A subclass sets ``noise_dim``, ``conditional`` and :attr:`_role` and defines :meth:`_network`."""

    _role = "sampler"

    def _network(self) -> nn.Module:
        raise NotImplementedError

    def _noise(self, n: int, like: Tensor) -> Tensor:
        return torch.randn(n, self.noise_dim, dtype=like.dtype, device=like.device)

    def _draw(self, n: int, labels: Tensor | None, like: Tensor, event_shape: tuple[int, ...]) -> Tensor:
        noise = self._noise(n, like)
        net = self._network()
        x = net(noise) if labels is None else net(noise, labels)
        if not isinstance(x, Tensor) or tuple(x.shape) != (n, *event_shape):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{self._role} output shape {shape} does not match the data: expected (num_samples, *data.shape[1:]) "
                f"= {(n, *event_shape)}; make the {self._role}'s output dimension equal the data dimension "
                f"(e.g. MLPSampler(noise_dim, data_dim={math.prod(event_shape)}))"
            )
        return x

    def _sample_labels(self, labels: Tensor | None, n: int) -> Tensor | None:
        if labels is None or n == labels.shape[0]:
            return labels
        return labels[torch.randint(labels.shape[0], (n,), device=labels.device)]

    def _check_inputs(self, data: Tensor, labels: Tensor | None, name: str = "data_batch") -> None:
        if not isinstance(data, Tensor):
            raise TypeError(f"{name} must be a tensor of shape (batch, ...), got {type(data).__name__}")
        if not data.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {data.dtype}; use data.float()")
        if not bool(torch.isfinite(data).all()):
            raise ValueError(f"{name} has non-finite values (NaN/inf); remove or impute them before training")
        if data.dim() < 2 or data.shape[0] < 1:
            raise ValueError(
                f"{name} must have shape (batch, *event_shape), got {tuple(data.shape)}; "
                "for a single example use data.unsqueeze(0)"
            )
        if labels is not None and not self.conditional:
            raise TypeError(
                f"labels were given but the {self._role} is unconditional (it takes only the noise); "
                "pass labels=None, or use a class-conditional one, e.g. MLPSampler(..., num_classes=K)"
            )
        if labels is None and self.conditional:
            raise TypeError(
                f"the {self._role} is class-conditional (it takes (noise, labels)) but no labels were given; "
                "pass labels=<(batch,) integer tensor>, or use an unconditional one (num_classes=None)"
            )
        _check_labels(labels, data.shape[0])

    def sample(self, n: int, labels: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """``n`` draws from the network (no gradient); noise and output live on its device/dtype (or ``noise``'s,
        when given)."""
        n = _int_at_least(n, "n", 1, "a positive int")
        if labels is not None and not self.conditional:
            raise TypeError(f"labels were given but the {self._role} is unconditional; pass labels=None")
        if labels is None and self.conditional:
            raise TypeError(f"the {self._role} is class-conditional: pass labels of shape (n,)")
        _check_labels(labels, n)
        net = self._network()
        if noise is None:
            noise = self._noise(n, next(net.parameters()))
        elif not isinstance(noise, Tensor) or noise.shape != (n, self.noise_dim):
            shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape (n, noise_dim) = ({n}, {self.noise_dim}), got {shape}")
        with torch.no_grad():
            return net(noise) if labels is None else net(noise, labels)


class AmortizedMLE(_NeuralSampling):
    """Amortized MLE (SteinGAN) for an energy-based model with a neural sampler.

    Each :meth:`step` (i) draws ``n`` noise vectors ``xi`` (and labels), ``x~ = sampler(xi[, y])``,
    computes the Stein direction ``phi`` for the score ``-grad_x E(x~[, y])`` and takes
    ``sampler_steps`` optimizer steps on ``-(1/n) sum_i x~_i . phi_i`` (the first with these
    samples, later ones with fresh draws); (ii) takes an optimizer step on the contrastive loss

    .. math::

        L(\\theta) = \\frac1B \\sum_{data} E_\\theta(x) - \\frac1n \\sum_{samples} E_\\theta(\\tilde x)
            \\; [+ \\alpha (\\overline{E(x)^2} + \\overline{E(\\tilde x)^2})],

    whose negative gradient is the likelihood gradient with the model expectation replaced by
    the sample mean (the samples of step (i), detached, as in the paper's Algorithm 2).

    The optimizers are plain ``torch.optim`` optimizers over ``energy.parameters()`` and
    ``sampler.parameters()``; the driver calls ``zero_grad``/``step`` on them (Adam with
    ``betas=(0.5, 0.9)`` works well, as for GANs).

    :param nn.Module energy: ``x -> E(x)`` of shape ``(batch,)``, or ``(x, y) -> E(x, y)`` for a
        class-conditional model.
    :param nn.Module sampler: ``noise -> x`` (or ``(noise, labels) -> x``); output shape must be
        ``(n, *data_event_shape)``.
    :param energy_optimizer: optimizer of the energy's parameters.
    :param sampler_optimizer: optimizer of the sampler's parameters.
    :param int noise_dim: dimension of the standard normal noise fed to the sampler.
    :param kernel: radial kernel (default :class:`~pyro_stein.kernels.RBFKernel` with the median
        heuristic).
    :param feature_fn: optional per-example feature map ``h`` for the kernel
        ``k_h(h(x), h(y))``, e.g. ``energy.features``; ``None`` for the sample space.
    :param bool repulsive: keep the kernel's repulsive term (``False``: the ablation).
    :param bool leave_one_out: leave-one-out Stein direction (see :mod:`pyro_stein.stein`).
    :param num_samples: sampler draws per step (default: the data batch size).
    :param int sampler_steps: sampler updates per energy update.
    :param float energy_l2: ``alpha`` above, an optional stabilizer (0 = exact contrastive loss).
    :param bool compute_ksd: report the KSD of the samples (sample-space kernel) in :meth:`step`.

    Example::

        driver = AmortizedMLE(rbm, sampler, torch.optim.Adam(rbm.parameters(), 1e-3),
                              torch.optim.Adam(sampler.parameters(), 1e-3), noise_dim=16)
        history = driver.run(x_train, num_steps=1000, batch_size=100)

    References: D. Wang, Q. Liu, "Learning to Draw Samples: With Application to Amortized MLE
    for Generative Adversarial Learning", 2016 (Algorithm 2).
    """

    def __init__(
        self,
        energy: nn.Module,
        sampler: nn.Module,
        energy_optimizer: torch.optim.Optimizer,
        sampler_optimizer: torch.optim.Optimizer,
        noise_dim: int,
        kernel: RadialKernel | None = None,
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        repulsive: bool = True,
        leave_one_out: bool = True,
        num_samples: int | None = None,
        sampler_steps: int = 1,
        energy_l2: float = 0.0,
        compute_ksd: bool = True,
    ):
        if not isinstance(energy, nn.Module):
            raise TypeError(
                f"energy must be an nn.Module mapping x -> energies of shape (batch,), got {type(energy).__name__}"
            )
        if not isinstance(sampler, nn.Module):
            raise TypeError(f"sampler must be an nn.Module mapping noise -> x, got {type(sampler).__name__}")
        for name, opt in (("energy_optimizer", energy_optimizer), ("sampler_optimizer", sampler_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"{name} must be a torch.optim.Optimizer (e.g. torch.optim.Adam(module.parameters(), 1e-3)), "
                    f"got {type(opt).__name__}"
                )
        noise_dim = _int_at_least(noise_dim, "noise_dim", 1, "a positive int")
        if kernel is not None and not isinstance(kernel, RadialKernel):
            raise TypeError(f"kernel must be a RadialKernel (e.g. RBFKernel()), got {type(kernel).__name__}")
        if num_samples is not None:
            num_samples = _int_at_least(num_samples, "num_samples", 2, "an int >= 2 or None")
        sampler_steps = _int_at_least(sampler_steps, "sampler_steps", 1, "a positive int")
        if not energy_l2 >= 0:
            raise ValueError(f"energy_l2 must be >= 0, got {energy_l2!r}")
        self.energy = energy
        self.sampler = sampler
        self.energy_optimizer = energy_optimizer
        self.sampler_optimizer = sampler_optimizer
        self.noise_dim = noise_dim
        self.kernel = kernel if kernel is not None else RBFKernel()
        self.feature_fn = feature_fn
        self.repulsive = bool(repulsive)
        self.leave_one_out = bool(leave_one_out)
        self.num_samples = num_samples
        self.sampler_steps = sampler_steps
        self.energy_l2 = float(energy_l2)
        self.compute_ksd = bool(compute_ksd)
        self.conditional = _takes_labels(sampler)
        self.num_steps_taken = 0

    # -- helpers -------------------------------------------------------------------------
    def _network(self) -> nn.Module:
        return self.sampler

    def _energy(self, x: Tensor, y: Tensor | None) -> Tensor:
        e = self.energy(x) if y is None else self.energy(x, y)
        return _one_per_example(e, x, "energy must return one energy per example", ", e.g. `return out.squeeze(-1)`")

    def score(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``-grad_x E(x[, y])`` at detached ``x`` (no gradient reaches the energy's parameters)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            e = self._energy(x, labels)
            (g,) = torch.autograd.grad(e.sum(), x)
        return -g

    def direction(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(phi, score)``: the Stein direction at the samples ``x`` for the current energy."""
        s = self.score(x, labels)
        phi = feature_stein_direction(x, s, self.feature_fn, self.kernel, self.leave_one_out, self.repulsive, labels)
        return phi, s

    # -- public API ----------------------------------------------------------------------
    def step(self, data_batch: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """One sampler update (``sampler_steps`` of them) and one energy update.

        :param Tensor data_batch: ``(batch, *event_shape)`` data.
        :param labels: ``(batch,)`` integer labels for a class-conditional model, else ``None``.
            The sampler's labels are the batch's labels (resampled when ``num_samples`` differs).
        :returns: diagnostics (floats):

            * ``contrastive_loss``: ``mean E(data) - mean E(samples)`` (minimised by the energy;
              near zero when the samples look like data to the energy);
            * ``energy_data``, ``energy_samples``: the two means;
            * ``energy_gap``: ``energy_samples - energy_data`` (= ``-contrastive_loss``);
            * ``phi_norm``: root mean square of the Stein direction;
            * ``ksd``: squared KSD (U-statistic, sample-space kernel) of the samples for the
              current energy, before the sampler update (``nan`` if ``compute_ksd=False``).
        """
        self._check_inputs(data_batch, labels)
        n = self.num_samples or data_batch.shape[0]
        if n < 2:
            raise ValueError("a Stein step needs at least 2 samples: use a data batch of >= 2 or set num_samples")
        event = tuple(data_batch.shape[1:])
        self.energy.train()
        self.sampler.train()
        # all or nothing: every check that can fail runs before the first update, except the Stein direction of a
        # second or later sampler sub-step; only then is the sampler's state kept to be restored
        saved = None
        if self.sampler_steps > 1:
            saved = (copy.deepcopy(self.sampler.state_dict()), copy.deepcopy(self.sampler_optimizer.state_dict()))
        try:
            return self._step(data_batch, labels, n, event)
        except BaseException:
            if saved is not None:
                self.sampler.load_state_dict(saved[0])
                self.sampler_optimizer.load_state_dict(saved[1])
            self.sampler_optimizer.zero_grad()
            self.energy_optimizer.zero_grad()
            raise

    def _step(self, data_batch: Tensor, labels: Tensor | None, n: int, event: tuple[int, ...]) -> dict[str, float]:
        # (0) the energy at the data: checked before anything moves
        e_data = self._energy(data_batch, labels)
        if not bool(torch.isfinite(e_data).all()):
            raise ValueError("the energy is not finite at some data points (outside its support?); nothing was updated")

        # (1) sampler: follow the Stein direction of the current energy; the energy's gradient (2) is taken at the
        # first draws, before the sampler moves (the sampler's updates do not touch the energy's parameters)
        ksd_val = float("nan")
        phi_sq = 0.0
        for t in range(self.sampler_steps):
            ys = self._sample_labels(labels, n)
            x = self._draw(n, ys, data_batch, event)
            phi, s = self.direction(x, ys)
            if not bool(torch.isfinite(phi).all()):
                raise ValueError(
                    "the Stein direction is not finite at the sampler's draws (the energy's gradient "
                    "overflowed or is NaN there); nothing was updated: lower the learning rates"
                )
            if t == 0:
                if self.compute_ksd:
                    z = x.detach().reshape(n, -1)
                    ksd_val = float(ksd_from_matrices(z, s.reshape(n, -1), self.kernel.matrices(z)))
                # (2) energy: contrastive likelihood gradient at the data and these samples
                self.energy_optimizer.zero_grad()
                e_samp = self._energy(x.detach(), ys)
                closs = e_data.mean() - e_samp.mean()
                total = closs
                if self.energy_l2 > 0:
                    total = total + self.energy_l2 * (e_data.pow(2).mean() + e_samp.pow(2).mean())
                total.backward()
                grads = [p.grad for p in self.energy.parameters() if p.grad is not None]
                if not bool(torch.isfinite(total)) or not all(bool(torch.isfinite(g).all()) for g in grads):
                    raise ValueError("the energy's contrastive loss or its gradient is not finite; nothing was updated")
            phi_sq += float(phi.pow(2).sum(tuple(range(1, phi.dim()))).mean())
            self.sampler_optimizer.zero_grad()
            loss = -(x * phi).reshape(n, -1).sum(-1).mean()
            loss.backward()
            self.sampler_optimizer.step()

        self.energy_optimizer.step()
        self.num_steps_taken += 1
        c = float(closs.detach())
        return {
            "contrastive_loss": c,
            "energy_data": float(e_data.detach().mean()),
            "energy_samples": float(e_samp.detach().mean()),
            "energy_gap": -c,
            "phi_norm": math.sqrt(phi_sq / self.sampler_steps),
            "ksd": ksd_val,
        }

    def run(
        self,
        data: Tensor,
        num_steps: int,
        batch_size: int = 100,
        labels: Tensor | None = None,
        progress_bar: bool = True,
        generator: torch.Generator | None = None,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run :meth:`step` on shuffled mini-batches (reshuffled every epoch).

        :param Tensor data: the training set, ``(N, *event_shape)``.
        :param int num_steps: number of steps (energy updates).
        :param int batch_size: mini-batch size (at most ``N``).
        :param labels: ``(N,)`` labels for a class-conditional model.
        :param bool progress_bar: show a tqdm bar with the latest diagnostics.
        :param generator: CPU generator for the shuffling.
        :param callback: called as ``callback(step_index, diagnostics)`` after every step.
        :returns: the list of diagnostics dicts, one per step.
        """
        self._check_inputs(data, labels)
        return _run_batches(self.step, data, labels, num_steps, batch_size, progress_bar, generator, callback)


def _run_batches(step, data, labels, num_steps, batch_size, progress_bar, generator, callback):
    from tqdm import tqdm

    N = data.shape[0]
    batch_size = _int_at_least(batch_size, "batch_size", 2, f"an int in [2, {N}] (the data size)")
    if batch_size > N:
        raise ValueError(f"batch_size must be an int in [2, {N}] (the data size), got {batch_size!r}")
    num_steps = _int_at_least(num_steps, "num_steps", 0, "a non-negative int")
    history: list[dict[str, float]] = []
    perm, pos = None, N
    bar = tqdm(range(num_steps), disable=not progress_bar, dynamic_ncols=True)
    for t in bar:
        if pos + batch_size > N:
            perm = torch.randperm(N, generator=generator).to(data.device)
            pos = 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        diag = step(data[idx], None if labels is None else labels[idx])
        history.append(diag)
        if progress_bar and (t % 10 == 0 or t == num_steps - 1):
            bar.set_postfix(
                {k: f"{v:.3g}" for k, v in diag.items() if k in ("contrastive_loss", "ksd") and not math.isnan(v)}
            )
        if callback is not None:
            callback(t, diag)
    bar.close()
    return history


class ContrastiveDivergence:
    """CD-k and persistent CD (PCD-k) for a :class:`GaussianBernoulliRBM` (the baselines).

    Each :meth:`step` takes one optimizer step on ``mean F(data) - mean F(x~)`` where ``x~`` are
    ``k`` block-Gibbs sweeps from the data batch (CD) or from persistent chains (PCD, chains
    started at the first data batch). Unconditional RBMs only.

    With ``exact=True`` the negatives are exact model draws (:meth:`GaussianBernoulliRBM.sample`,
    as many as the batch), so the update is the exact stochastic maximum-likelihood gradient:
    the reference that no sample-based negative phase (CD, PCD or amortized MLE) can beat in
    expectation for the same optimizer, batches and number of updates.

    :param GaussianBernoulliRBM rbm: the model.
    :param optimizer: a ``torch.optim`` optimizer of ``rbm.parameters()``.
    :param int k: Gibbs sweeps per update.
    :param bool persistent: PCD instead of CD.
    :param num_chains: number of persistent chains (default: the batch size).
    :param bool exact: exact negatives instead of Gibbs sweeps (needs ``num_hidden <= 20``).

    Example::

        cd = ContrastiveDivergence(rbm, torch.optim.Adam(rbm.parameters(), 1e-3), k=1, persistent=True)
        cd.run(x_train, num_steps=1000, batch_size=100)
    """

    def __init__(
        self,
        rbm: GaussianBernoulliRBM,
        optimizer: torch.optim.Optimizer,
        k: int = 1,
        persistent: bool = False,
        num_chains: int | None = None,
        exact: bool = False,
    ):
        if not isinstance(rbm, GaussianBernoulliRBM):
            raise TypeError(f"rbm must be a GaussianBernoulliRBM, got {type(rbm).__name__}")
        if rbm.num_classes is not None:
            raise ValueError("ContrastiveDivergence supports unconditional RBMs only (num_classes=None)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        k = _int_at_least(k, "k", 1, "a positive int")
        if exact and persistent:
            raise ValueError(
                "exact=True draws fresh exact negatives each step; it has no persistent chains (persistent=False)"
            )
        if exact and rbm.num_hidden > _MAX_EXACT_HIDDEN:
            raise ValueError(
                "exact=True enumerates the 2^H hidden states: "
                f"needs num_hidden <= {_MAX_EXACT_HIDDEN}, got {rbm.num_hidden}"
            )
        self.rbm = rbm
        self.exact = bool(exact)
        self.optimizer = optimizer
        self.k = k
        self.persistent = bool(persistent)
        self.num_chains = num_chains
        self.chains: Tensor | None = None

    def step(self, data_batch: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """One update; returns ``contrastive_loss``, ``energy_data``, ``energy_samples``, ``energy_gap``."""
        if labels is not None:
            raise TypeError("ContrastiveDivergence is unconditional: pass labels=None")
        if data_batch.dim() != 2 or data_batch.shape[1] != self.rbm.num_visible:
            raise ValueError(
                f"data_batch must have shape (batch, {self.rbm.num_visible}), got {tuple(data_batch.shape)}"
            )
        like = next(self.rbm.parameters())
        if data_batch.dtype != like.dtype or data_batch.device != like.device:
            raise ValueError(
                f"data_batch is {data_batch.dtype} on {data_batch.device} but the RBM's parameters are {like.dtype} on "
                f"{like.device}; convert one to the other (e.g. data.to(rbm.W))"
            )
        if self.exact:
            neg = self.rbm.sample(data_batch.shape[0])
        elif self.persistent:  # the chains are kept only once the step has succeeded
            chains = self.chains
            if chains is None:
                m = self.num_chains or data_batch.shape[0]
                chains = data_batch[torch.arange(m, device=data_batch.device) % data_batch.shape[0]].detach().clone()
            neg = self.rbm.gibbs(chains, self.k)
        else:
            neg = self.rbm.gibbs(data_batch.detach(), self.k)
        self.optimizer.zero_grad()
        e_data, e_neg = self.rbm(data_batch), self.rbm(neg)
        loss = e_data.mean() - e_neg.mean()
        loss.backward()
        self.optimizer.step()
        if self.persistent and not self.exact:
            self.chains = neg
        c = float(loss.detach())
        return {
            "contrastive_loss": c,
            "energy_data": float(e_data.detach().mean()),
            "energy_samples": float(e_neg.detach().mean()),
            "energy_gap": -c,
        }

    def run(
        self,
        data: Tensor,
        num_steps: int,
        batch_size: int = 100,
        progress_bar: bool = True,
        generator: torch.Generator | None = None,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run :meth:`step` on shuffled mini-batches (see :meth:`AmortizedMLE.run`)."""
        return _run_batches(self.step, data, None, num_steps, batch_size, progress_bar, generator, callback)
