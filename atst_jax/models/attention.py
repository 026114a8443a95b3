"""Transformer blocks shared by every encoder and predictor: self-attention, cross-attention, MLP, drop-path.

Conventions (spec/methods.md §0): pre-norm, LayerNorm eps 1e-6, exact (erf) GELU, head dim = width / heads
with the 1/√head_dim scale, output projection with bias, and key padding as an additive −10000 on the
logits (not −inf, so a fully padded row stays finite). Parameters are float32 and carry logical axis names;
matmuls run in ``x.dtype`` while the softmax runs in float32.

Attention keeps heads-major layouts (``[B, H, N, hd]``) straight out of the projections: on XLA:CPU the
batched matmuls run ~2.5× faster that way than with heads in the middle (``[B, N, H, hd]``), and the
kernels are laid out ``[D, (3,) H, hd]`` so tensor parallelism splits whole heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax.models.layers import LayerNorm, Linear, gelu_exact
from atst_jax.sharding import constrain

PAD_LOGIT = -10000.0  # additive key mask of the official code (not -inf: fully padded rows stay finite)

_HEADS_MAJOR = ("act_batch", "act_heads", "act_length", None)


def key_bias(valid):
    """``[B, K]`` additive logit bias from a key mask (True = a real key): 0 there, ``PAD_LOGIT`` elsewhere."""
    return jnp.where(valid, 0.0, PAD_LOGIT)


def _attend(q, k, v, bias, scale):
    """Softmax attention on heads-major ``q [B, H, Q, hd]``, ``k, v [B, H, K, hd]``; ``bias [B, K]``."""
    q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) + bias[:, None, None, :]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection (bias optional: ATST none, ASiT on)."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, rngs: nnx.Rngs):
        hd = dim // heads
        # qkv kernel kept as [D, 3, H, hd] (the PyTorch export reshapes it to the official [3D, D] weight,
        # rows [q; k; v], head-major).
        self.qkv = Linear(
            dim, (3, heads, hd), axes=("embed", None, "heads", "kv"), use_bias=qkv_bias, rngs=rngs
        )
        self.proj = Linear((heads, hd), dim, axes=("heads", "kv", "embed"), use_bias=True, rngs=rngs)
        self.scale = hd**-0.5

    def __call__(self, x, key_bias):
        w = self.qkv.kernel[...].astype(x.dtype)
        qkv = jnp.einsum("bnd,dthk->tbhnk", x, w)
        if self.qkv.bias is not None:
            qkv = qkv + self.qkv.bias[...].astype(x.dtype)[:, None, :, None, :]
        qkv = constrain(qkv, (None,) + _HEADS_MAJOR)
        out = _attend(qkv[0], qkv[1], qkv[2], key_bias, self.scale)
        proj = self.proj.kernel[...].astype(out.dtype)
        return jnp.einsum("bhnk,hkd->bnd", out, proj) + self.proj.bias[...].astype(out.dtype)


class CrossAttention(nnx.Module):
    """Queries ``[B, Q, q_dim]`` attend to keys/values ``[B, K, kv_dim]`` (projected to the query width).

    Only the keys/values are attended to: queries never see each other, so each query's output depends on
    the key set alone (data2vec 2.0 / AaSP-style predictor: masked-position queries read visible tokens).
    """

    def __init__(self, q_dim: int, kv_dim: int, heads: int, *, qkv_bias: bool = False, rngs: nnx.Rngs):
        if q_dim % heads:
            raise ValueError(f"cross-attention width {q_dim} is not divisible by {heads} heads")
        hd = q_dim // heads
        self.q = Linear(q_dim, (heads, hd), axes=("embed", "heads", "kv"), use_bias=qkv_bias, rngs=rngs)
        # k and v fused as [kv_dim, 2, H, hd], like the self-attention qkv kernel.
        self.kv = Linear(
            kv_dim, (2, heads, hd), axes=("embed", None, "heads", "kv"), use_bias=qkv_bias, rngs=rngs
        )
        self.proj = Linear((heads, hd), q_dim, axes=("heads", "kv", "embed"), use_bias=True, rngs=rngs)
        self.scale = hd**-0.5

    def __call__(self, q, kv, key_bias):
        """``q [B, Q, q_dim]``, ``kv [B, K, kv_dim]``, ``key_bias [B, K]`` → ``[B, Q, q_dim]``."""
        wq = self.q.kernel[...].astype(q.dtype)
        qh = jnp.einsum("bqd,dhk->bhqk", q, wq)
        wkv = self.kv.kernel[...].astype(q.dtype)
        kvh = jnp.einsum("bnd,dthk->tbhnk", kv.astype(q.dtype), wkv)
        if self.q.bias is not None:
            qh = qh + self.q.bias[...].astype(q.dtype)[None, :, None, :]
            kvh = kvh + self.kv.bias[...].astype(q.dtype)[:, None, :, None, :]
        qh = constrain(qh, _HEADS_MAJOR)
        kvh = constrain(kvh, (None,) + _HEADS_MAJOR)
        out = _attend(qh, kvh[0], kvh[1], key_bias, self.scale)
        proj = self.proj.kernel[...].astype(out.dtype)
        return jnp.einsum("bhqk,hkd->bqd", out, proj) + self.proj.bias[...].astype(out.dtype)


class Mlp(nnx.Module):
    """``Linear → exact GELU → Linear`` with hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.fc2(constrain(gelu_exact(self.fc1(x)), ("act_batch", "act_length", "act_mlp")))


def drop_path(x, rate, key):
    """Per-sample stochastic depth, as timm/official: keep with prob 1-rate, scale kept paths by 1/(1-rate)."""
    keep = 1.0 - rate
    u = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
    mask = jnp.floor(keep + u)
    return x * (mask / keep).astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm self-attention block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, qkv_bias: bool = False, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, rngs=rngs)

    def __call__(self, x, key_bias, rate, key, train: bool):
        y = self.attn(self.norm1(x), key_bias)
        if train:
            k1, k2 = jax.random.split(key)
            y = drop_path(y, rate, k1)
        x = x + y
        y = self.mlp(self.norm2(x))
        if train:
            y = drop_path(y, rate, k2)
        return x + y


class CrossBlock(nnx.Module):
    """Pre-norm cross-attention block: ``q + CrossAttn(LN(q), LN(kv))``, then ``q + MLP(LN(q))``.

    The keys/values get their own LayerNorm (``norm_kv``, width ``kv_dim``): they usually come from another
    network (the student encoder) whose output scale the predictor should not depend on.
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        self.norm_q = LayerNorm(dim)
        self.norm_kv = LayerNorm(kv_dim)
        self.attn = CrossAttention(dim, kv_dim, heads, qkv_bias=qkv_bias, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)

    def __call__(self, q, kv, kv_valid=None):
        """``q [B, Q, dim]``, ``kv [B, K, kv_dim]``, ``kv_valid [B, K]`` bool (True = a real key; None = all)."""
        if kv_valid is None:
            kv_valid = jnp.ones(kv.shape[:2], bool)
        x = q + self.attn(self.norm_q(q), self.norm_kv(kv).astype(q.dtype), key_bias(kv_valid))
        return x + self.mlp(self.norm2(x))
