"""Small building blocks shared by every model: Linear, LayerNorm, Identity, BatchNorm over masked tokens, init.

Each parameter carries logical axis names in its ``axes`` metadata (see ``atst_jax.sharding``).
Parameters are stored in float32; ``x.dtype`` decides the compute dtype of matmuls, while normalisations
always run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LN_EPS = 1e-6  # the official FrameAST uses LayerNorm(eps=1e-6) everywhere
BN_EPS = 1e-5  # PyTorch BatchNorm1d default, as in the official projector/predictor
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch


def trunc_normal(key, shape, std=0.02, dtype=jnp.float32):
    """PyTorch ``trunc_normal_(std=std, a=-2, b=2)``: the bounds are absolute (±2), not ±2 std.

    With std 0.02 that is a normal truncated at ±100 std, so effectively an untruncated normal; jax's
    ``initializers.truncated_normal`` would instead truncate at ±2 std and rescale, a different distribution.
    """
    return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype) * std


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[*in_shape, *out_shape]`` (in_shape/out_shape may be tuples)."""

    def __init__(
        self, in_shape, out_shape, *, axes, use_bias=True, rngs: nnx.Rngs, init="trunc_normal", std=0.02
    ):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.n_in = len(in_shape)
        shape = in_shape + out_shape
        bias = jnp.zeros(out_shape, jnp.float32)
        if init == "trunc_normal":  # the encoder's explicit init (biases 0)
            kernel = trunc_normal(rngs.params(), shape, std)
        elif init == "torch_default":
            # nn.Linear's / nn.Conv2d's own init: kernel kaiming_uniform(a=√5) = U(±1/√fan_in), and the bias
            # U(±1/√fan_in) too. The bias is drawn from a key folded out of the kernel's, so every later draw
            # of the module (positions, blocks, …) is the same with or without a bias.
            key = rngs.params()
            bound = 1.0 / np.sqrt(np.prod(in_shape))
            kernel = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
            if use_bias:
                bias = jax.random.uniform(jax.random.fold_in(key, 1), out_shape, jnp.float32, -bound, bound)
        else:
            raise ValueError(f"unknown init {init!r}")
        self.kernel = nnx.Param(kernel, axes=tuple(axes))
        self.bias = nnx.Param(bias, axes=tuple(axes[self.n_in :])) if use_bias else None

    def __call__(self, x):
        kernel = self.kernel[...].astype(x.dtype)
        y = jax.lax.dot_general(
            x, kernel, (((tuple(range(x.ndim - self.n_in, x.ndim))), tuple(range(self.n_in))), ((), ()))
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, eps 1e-6, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, eps: float = LN_EPS, axis_name: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=(axis_name,))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class Identity(nnx.Module):
    """A parameter-free stand-in for a LayerNorm that a layout does not have (the post-norm encoder's final
    ``norm``): returns its input, and adds nothing to the parameter tree."""

    def __call__(self, x):
        return x


class MaskedBatchNorm(nnx.Module):
    """BatchNorm1d whose batch statistics cover only the valid entries of a padded token set.

    ``x`` is ``[..., C]`` with a ``weights`` array of the leading shape (1 = a real token, 0 = padding).
    Under ``jax.jit`` with a global batch the statistics are over the whole global batch — the JAX
    equivalent of PyTorch's SyncBatchNorm. Normalisation uses the biased variance; the running variance is
    updated with the unbiased one, as PyTorch does.
    """

    def __init__(self, dim: int, *, affine: bool = True, axis_name: str = "proj_hidden"):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=(axis_name,)) if affine else None
        self.running_mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), axes=(axis_name,))
        self.running_var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), axes=(axis_name,))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32), axes=())

    def __call__(self, x, weights, *, use_running_average: bool = False, update_stats: bool = True):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            # Statistics as (weights @ x) matmuls: XLA:CPU runs column reductions over thousands of rows
            # ~10x slower than the equivalent GEMV, and the backward of a dot is again a dot.
            w = weights.astype(jnp.float32).reshape(-1)
            x2 = x.reshape(-1, x.shape[-1])
            count = jnp.maximum(jnp.sum(w), 1.0)
            mean = (w @ x2) / count
            var = (w @ jnp.square(x2 - mean)) / count
            if update_stats:
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                m = BN_MOMENTUM
                self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
                self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(unbiased)
                self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        y = (x - mean) * jax.lax.rsqrt(var + BN_EPS)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(dtype)


def gelu_exact(x):
    """GELU with erf, as ``torch.nn.GELU()``; Flax/JAX default to the tanh approximation."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / np.sqrt(2.0), x.dtype)))
