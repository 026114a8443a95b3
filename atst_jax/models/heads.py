"""Projection and prediction heads shared by the BYOL-style methods (ATST-Frame, ATST-Clip)."""

from __future__ import annotations

import jax
from flax import nnx

from atst_jax.models.layers import Linear, MaskedBatchNorm


class BNMLP(nnx.Module):
    """``Linear(no bias) → BatchNorm → ReLU → Linear(no bias)``: the official ``build_mlp(2, ..., last_bn=False)``.

    The official heads are plain ``nn.Linear`` layers that keep PyTorch's default init (the encoder's
    trunc-normal init is not applied to them), reproduced with ``init="torch_default"``.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, in_axis: str, rngs: nnx.Rngs):
        self.fc1 = Linear(
            d_in, d_hidden, axes=(in_axis, "proj_hidden"), use_bias=False, init="torch_default", rngs=rngs
        )
        self.bn = MaskedBatchNorm(d_hidden)
        self.fc2 = Linear(
            d_hidden, d_out, axes=("proj_hidden", "proj_out"), use_bias=False, init="torch_default", rngs=rngs
        )

    def __call__(self, x, weights, *, use_running_average: bool = False):
        """``x [..., d_in]`` with ``weights [...]`` marking the real tokens (batch statistics cover only those)."""
        h = self.bn(self.fc1(x), weights, use_running_average=use_running_average)
        return self.fc2(jax.nn.relu(h))
