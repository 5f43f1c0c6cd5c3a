"""Tests for the frame maps (pyro_stein.frames)."""

import pytest
import torch

from pyro_stein.frames import unwhiten, whiten


def _scale(kind: str, D: int) -> torch.Tensor:
    a = torch.randn(D, D) + 2.0 * torch.eye(D)
    return {"lower": torch.tril(a), "upper": torch.triu(a), "full": a}[kind]


@pytest.mark.parametrize("kind", ["lower", "upper", "full"])
def test_whiten_inverts_unwhiten_for_any_invertible_scale(kind):
    """The Laplace frame's ``L = R^{-T}`` is upper triangular and an adaptive frame's lower: ``whiten`` must invert
    ``unwhiten`` for both (and for a full matrix), for one frame and for one frame per dataset."""
    D = 3
    loc, scale = torch.randn(D), _scale(kind, D)
    u = torch.randn(5, D)
    z = unwhiten(u, loc, scale)
    torch.testing.assert_close(z, loc + u @ scale.T)
    torch.testing.assert_close(whiten(z, loc, scale), u)
    locs, scales = torch.randn(2, D), torch.stack([_scale(kind, D) for _ in range(2)])
    u = torch.randn(2, 5, D)
    z = unwhiten(u, locs, scales)
    torch.testing.assert_close(z[1], locs[1] + u[1] @ scales[1].T)
    torch.testing.assert_close(whiten(z, locs, scales), u)
