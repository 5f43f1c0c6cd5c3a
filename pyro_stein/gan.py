"""A standard GAN with the non-saturating loss: the baseline for SteinGAN (:mod:`pyro_stein.ebm`).

Goodfellow et al. (2014): a discriminator ``D(x[, y])`` returning one logit per example and a
generator ``x = G(xi[, y])``. Each :meth:`GAN.step` takes one discriminator update on

.. math::

    L_D = \\frac1B \\sum_{data} \\mathrm{softplus}(-D(x)) + \\frac1n \\sum_{samples} \\mathrm{softplus}(D(\\tilde x)),

(the logistic loss of telling data from samples), then one generator update on the
non-saturating loss ``L_G = (1/n) sum softplus(-D(G(xi)))`` at fresh draws. The API mirrors
:class:`~pyro_stein.ebm.AmortizedMLE` (``step``, ``run``, ``sample``), so the two can be run with
the same generator architecture (e.g. :class:`~pyro_stein.ebm.MLPSampler`, class-conditional
with ``num_classes``), the same optimizers and the same number of updates. A discriminator of
the same size as SteinGAN's energy is the energy network itself, read as ``D = -E`` (or
``D = E``; the sign is learned): any module ``(x[, y]) -> (batch,)`` works.

Example::

    disc = MLPEnergy(2, confinement=None)
    gen = MLPSampler(noise_dim=4, data_dim=2)
    gan = GAN(disc, gen, torch.optim.Adam(disc.parameters(), 1e-3, betas=(0.5, 0.9)),
              torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.9)), noise_dim=4)
    history = gan.run(sample_toy_2d("mixture", 2000), num_steps=2000, batch_size=128)
    x = gan.sample(500)

References: I. Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import _int_at_least
from .ebm import _NeuralSampling, _one_per_example, _run_batches, _takes_labels

__all__ = ["GAN"]


class GAN(_NeuralSampling):
    """Non-saturating GAN trainer (see the module docstring).

    :param nn.Module discriminator: ``x -> logits`` of shape ``(batch,)`` (``(x, y) -> logits`` when
        the generator is class-conditional); a large logit means "looks like data".
    :param nn.Module generator: ``noise -> x`` (or ``(noise, labels) -> x``), output
        ``(n, *data_event_shape)``.
    :param discriminator_optimizer: a ``torch.optim`` optimizer of the discriminator's parameters.
    :param generator_optimizer: a ``torch.optim`` optimizer of the generator's parameters.
    :param int noise_dim: dimension of the standard normal noise.
    :param num_samples: generator draws per step (default: the data batch size).

    Example::

        gan = GAN(disc, gen, opt_d, opt_g, noise_dim=32)
        gan.run(x_train, num_steps=2000, batch_size=100, labels=y_train)
    """

    _role = "generator"

    def __init__(
        self,
        discriminator: nn.Module,
        generator: nn.Module,
        discriminator_optimizer: torch.optim.Optimizer,
        generator_optimizer: torch.optim.Optimizer,
        noise_dim: int,
        num_samples: int | None = None,
    ):
        if not isinstance(discriminator, nn.Module):
            raise TypeError(
                "discriminator must be an nn.Module mapping x -> logits of shape (batch,), "
                f"got {type(discriminator).__name__}"
            )
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module mapping noise -> x, got {type(generator).__name__}")
        for name, opt in (
            ("discriminator_optimizer", discriminator_optimizer),
            ("generator_optimizer", generator_optimizer),
        ):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"{name} must be a torch.optim.Optimizer (e.g. torch.optim.Adam(module.parameters(), 1e-3)), "
                    f"got {type(opt).__name__}"
                )
        self.noise_dim = _int_at_least(noise_dim, "noise_dim", 1, "a positive int")
        if num_samples is not None:
            num_samples = _int_at_least(num_samples, "num_samples", 1, "a positive int or None")
        self.discriminator = discriminator
        self.generator = generator
        self.discriminator_optimizer = discriminator_optimizer
        self.generator_optimizer = generator_optimizer
        self.num_samples = num_samples
        self.conditional = _takes_labels(generator)
        self.num_steps_taken = 0

    # -- helpers -------------------------------------------------------------------------
    def _network(self) -> nn.Module:
        return self.generator

    def _logits(self, x: Tensor, y: Tensor | None) -> Tensor:
        d = self.discriminator(x) if y is None else self.discriminator(x, y)
        return _one_per_example(d, x, "discriminator must return one logit per example")

    # -- public API ----------------------------------------------------------------------
    def step(self, data_batch: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """One discriminator update, then one generator update.

        :param Tensor data_batch: ``(batch, *event_shape)`` data.
        :param labels: ``(batch,)`` integer labels for a class-conditional model; the generator's
            labels are the batch's (resampled when ``num_samples`` differs).
        :returns: ``discriminator_loss`` (``L_D`` before its update), ``generator_loss`` (``L_G``
            before its update), ``d_real`` and ``d_fake`` (mean probability "data" on the data and
            on the samples, before the discriminator's update).
        :raises ValueError: when a loss or gradient is not finite (nothing is updated by the
            failing half-step).
        """
        self._check_inputs(data_batch, labels)
        n = self.num_samples or data_batch.shape[0]
        event = tuple(data_batch.shape[1:])
        self.discriminator.train()
        self.generator.train()
        ys = self._sample_labels(labels, n)

        # (1) discriminator
        with torch.no_grad():
            fake = self._draw(n, ys, data_batch, event)
        self.discriminator_optimizer.zero_grad()
        d_real = self._logits(data_batch, labels)
        d_fake = self._logits(fake, ys)
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        if not bool(torch.isfinite(loss_d)):
            self.discriminator_optimizer.zero_grad()
            raise ValueError("the discriminator's loss is not finite; nothing was updated: lower the learning rates")
        loss_d.backward()
        self.discriminator_optimizer.step()

        # (2) generator, non-saturating loss at fresh draws; only the generator's optimizer steps
        ys = self._sample_labels(labels, n)
        self.generator_optimizer.zero_grad()
        x = self._draw(n, ys, data_batch, event)
        loss_g = F.softplus(-self._logits(x, ys)).mean()
        if not bool(torch.isfinite(loss_g)):
            self.generator_optimizer.zero_grad()
            raise ValueError(
                "the generator's loss is not finite; the generator was not updated: lower the learning rates"
            )
        loss_g.backward()
        self.generator_optimizer.step()
        self.discriminator_optimizer.zero_grad()  # drop the generator loss's gradient on the discriminator
        self.num_steps_taken += 1
        return {
            "discriminator_loss": float(loss_d.detach()),
            "generator_loss": float(loss_g.detach()),
            "d_real": float(torch.sigmoid(d_real.detach()).mean()),
            "d_fake": float(torch.sigmoid(d_fake.detach()).mean()),
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
        """Run :meth:`step` on shuffled mini-batches (reshuffled every epoch), as
        :meth:`pyro_stein.ebm.AmortizedMLE.run` does.

        :param Tensor data: the training set, ``(N, *event_shape)``.
        :param int num_steps: number of steps (one discriminator and one generator update each).
        :param int batch_size: mini-batch size (at most ``N``).
        :param labels: ``(N,)`` labels for a class-conditional model.
        :param bool progress_bar: show a tqdm bar.
        :param generator: CPU random generator for the shuffling.
        :param callback: called as ``callback(step_index, diagnostics)`` after every step.
        :returns: the list of diagnostics dicts, one per step.
        """
        self._check_inputs(data, labels, "data")
        return _run_batches(self.step, data, labels, num_steps, batch_size, progress_bar, generator, callback)
