"""DINO-style self-distillation parts and a patch reconstruction head (spec/methods.md §4, ASiT).

- ``DinoHead``: the shared MLP trunk ``D → hidden → GELU → hidden → GELU → bottleneck``, L2 normalisation
  (``F.normalize`` semantics, eps 1e-12), then two weight-normalised prototype layers without bias: the CLS
  token → ``cls_prototypes``, every patch token → ``data_prototypes``.
- ``WeightNormLinear``: ``torch.nn.utils.weight_norm`` on a bias-free Linear with the gain fixed at 1, so the
  layer is ``x @ (v / ‖v‖)`` with one unit-norm column per output; only the direction ``v`` is a parameter
  (a gain that never trains is not a parameter here: nothing to decay, average or checkpoint).
- ``ReconstructionHead``: ``D → hidden → GELU → hidden → GELU → bottleneck → GELU`` per patch token, then a
  transposed convolution with kernel = stride = patch back to pixels. With kernel = stride that convolution
  is a per-token matmul ``[bottleneck, p_t·p_f]`` plus one bias shared by every pixel (its single output
  channel); the caller puts the patches back in place with the encoder's ``unpatchify``.
- ``dino_cross_entropy`` / ``centre_update`` / ``entropy``: the loss terms and the collapse monitor.

Initialisation as the official PyTorch heads: the MLP layers trunc-normal 0.02 with zero biases; the
prototype layers and the transposed convolution are created after that re-initialisation, so they keep
PyTorch's default ``U(±1/√fan_in)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax.models.layers import Linear, gelu_exact


def l2_normalize(x, eps: float = 1e-12):
    """``F.normalize(x, dim=-1)``: ``x / max(‖x‖, eps)``, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class WeightNormLinear(nnx.Module):
    """Bias-free ``x @ (v / ‖v‖₀)`` (column-normalised ``v [d_in, d_out]``; the gain is fixed at 1)."""

    def __init__(self, d_in: int, d_out: int, *, axes, rngs: nnx.Rngs):
        bound = 1.0 / np.sqrt(d_in)  # nn.Linear's default init of the direction v
        self.kernel = nnx.Param(
            jax.random.uniform(rngs.params(), (d_in, d_out), jnp.float32, -bound, bound), axes=tuple(axes)
        )

    def weight(self):
        """The effective weight ``[d_in, d_out]``: every output column has unit norm."""
        v = self.kernel[...]
        return v / jnp.linalg.norm(v, axis=0, keepdims=True)

    def __call__(self, x):
        return x @ self.weight().astype(x.dtype)


class DinoHead(nnx.Module):
    """Shared MLP trunk + L2 norm + weight-normalised prototypes for the CLS token and the patch tokens."""

    def __init__(
        self, d_in: int, hidden: int, bottleneck: int, cls_prototypes: int, data_prototypes: int, *, rngs
    ):
        self.fc1 = Linear(d_in, hidden, axes=("embed", "proj_hidden"), rngs=rngs)
        self.fc2 = Linear(hidden, hidden, axes=("proj_hidden", None), rngs=rngs)
        self.fc3 = Linear(hidden, bottleneck, axes=("proj_hidden", "proj_out"), rngs=rngs)
        self.cls_layer = WeightNormLinear(
            bottleneck, cls_prototypes, axes=("proj_out", "prototypes"), rngs=rngs
        )
        self.data_layer = WeightNormLinear(
            bottleneck, data_prototypes, axes=("proj_out", "prototypes"), rngs=rngs
        )

    def __call__(self, tokens, n_prefix: int = 1):
        """``tokens [B, n_prefix + N, D]`` (CLS first) → CLS logits ``[B, cls_prototypes]`` and patch logits
        ``[B, N, data_prototypes]``, both float32."""
        h = gelu_exact(self.fc1(tokens))
        h = gelu_exact(self.fc2(h))
        z = l2_normalize(self.fc3(h)).astype(tokens.dtype)
        cls = self.cls_layer(z[:, 0]).astype(jnp.float32)
        data = self.data_layer(z[:, n_prefix:]).astype(jnp.float32)
        return cls, data


class ReconstructionHead(nnx.Module):
    """Per-token MLP + a kernel = stride transposed convolution: ``[B, N, D] → [B, N, patch_dim]`` pixels."""

    def __init__(self, d_in: int, hidden: int, bottleneck: int, patch_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = Linear(d_in, hidden, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Linear(hidden, hidden, axes=("mlp", None), rngs=rngs)
        self.fc3 = Linear(hidden, bottleneck, axes=("mlp", None), rngs=rngs)
        # ConvTranspose2d(bottleneck, 1, k, k).weight [bottleneck, 1, p_t, p_f]: its fan-in for the default
        # init is size(1)·p_t·p_f = patch_dim, so both the kernel and the bias are U(±1/√patch_dim).
        bound = 1.0 / np.sqrt(patch_dim)
        self.deconv_kernel = nnx.Param(
            jax.random.uniform(rngs.params(), (bottleneck, patch_dim), jnp.float32, -bound, bound),
            axes=(None, "pixels"),
        )
        self.deconv_bias = nnx.Param(
            jax.random.uniform(rngs.params(), (1,), jnp.float32, -bound, bound), axes=(None,)
        )

    def __call__(self, tokens):
        h = gelu_exact(self.fc1(tokens))
        h = gelu_exact(self.fc2(h))
        h = gelu_exact(self.fc3(h))
        out = h @ self.deconv_kernel[...].astype(h.dtype) + self.deconv_bias[...].astype(h.dtype)
        return out.astype(jnp.float32)


def _weighted_mean(x, weights):
    if weights is None:
        return jnp.mean(x)
    w = weights.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def teacher_probs(teacher_logits, centre, teacher_temp):
    """``softmax((t − c) / τ_t)`` with stop-gradient: the centred, sharpened teacher targets."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    return jax.nn.softmax((t - centre) / teacher_temp, axis=-1)


def dino_cross_entropy(student_logits, teacher_logits, centre, *, student_temp, teacher_temp, weights=None):
    """Mean over rows of ``−Σ_k q_k log p_k`` with ``q = softmax((t − c)/τ_t)`` (no gradient) and
    ``p = softmax(s/τ_s)``; ``weights`` (same leading shape, 1 = a real row) restricts the mean."""
    q = teacher_probs(teacher_logits, centre, teacher_temp)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return _weighted_mean(-jnp.sum(q * log_p, axis=-1), weights)


def centre_update(centre, teacher_logits, momentum: float, weights=None):
    """``c ← m·c + (1 − m)·mean(t)`` over all rows of the (global) batch, without gradient."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)).reshape(-1, teacher_logits.shape[-1])
    if weights is None:
        mean = jnp.mean(t, axis=0)
    else:
        w = weights.astype(jnp.float32).reshape(-1)
        mean = (w @ t) / jnp.maximum(jnp.sum(w), 1.0)
    return momentum * centre + (1.0 - momentum) * mean


def entropy(probs, axis: int = -1):
    """Shannon entropy (nats) of probability vectors, ``0·log 0 = 0``."""
    p = probs.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)
