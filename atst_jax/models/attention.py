"""Transformer blocks shared by every encoder and predictor: self-attention, cross-attention, MLP, drop-path.

Conventions (spec/methods.md §0): pre-norm (the self-attention ``Block`` also has EAT's post-norm layout,
``norm_style="post"``), LayerNorm eps 1e-6, exact (erf) GELU, head dim = width / heads with the 1/√head_dim
scale, output projection with bias, and key padding as an additive −10000 on the
logits (not −inf, so a fully padded row stays finite). Parameters are float32 and carry logical axis names;
matmuls run in ``x.dtype`` while the softmax runs in float32.

Attention keeps heads-major layouts (``[B, H, N, hd]``) straight out of the projections: on XLA:CPU the
batched matmuls run ~2.5× faster that way than with heads in the middle (``[B, N, H, hd]``), and the
kernels are laid out ``[D, (3,) H, hd]`` so tensor parallelism splits whole heads.

Self-attention has three implementations (``EncoderConfig.attention``), the same function of the inputs:
``xla`` (default) the einsums above with the additive −10000 key bias; ``dot_product_attention`` through
``jax.nn.dot_product_attention`` (``implementation=None``: XLA today, whatever JAX picks later) with the
key padding as a boolean mask, in its ``[B, N, H, hd]`` layout; ``cudnn`` the same call with
``implementation="cudnn"`` (cuDNN's fused flash attention) and the padding as per-sequence key lengths,
used where it can run (a CUDA backend, bf16/fp16 compute) and otherwise the ``dot_product_attention`` path,
so a run configured for it still embeds and exports on a CPU in float32. Masked keys get exactly zero
weight in all three; they differ only for a sequence with no valid key at all, which the encoder never
builds (every crop has at least one token). ``cudnn`` takes the valid keys to be a prefix of each
sequence, as ``FrameAST.valid_mask`` makes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax.models.layers import LayerNorm, Linear, gelu_exact
from atst_jax.sharding import constrain

PAD_LOGIT = -10000.0  # additive key mask of the official code (not -inf: fully padded rows stay finite)

_HEADS_MAJOR = ("act_batch", "act_heads", "act_length", None)
_LENGTH_MAJOR = ("act_batch", "act_length", "act_heads", None)  # jax.nn.dot_product_attention's BTNH

ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn")


def key_bias(valid):
    """``[B, K]`` additive logit bias from a key mask (True = a real key): 0 there, ``PAD_LOGIT`` elsewhere."""
    return jnp.where(valid, 0.0, PAD_LOGIT)


def _attend(q, k, v, bias, scale):
    """Softmax attention on heads-major ``q [B, H, Q, hd]``, ``k, v [B, H, K, hd]``; ``bias [B, K]``."""
    q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) + bias[:, None, None, :]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def cudnn_usable(dtype) -> bool:
    """Whether ``attention="cudnn"`` runs cuDNN here: a CUDA backend and half-precision compute."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _attend_fused(q, k, v, bias, scale, impl):
    """``jax.nn.dot_product_attention`` on length-major ``q, k, v [B, N, H, hd]``; ``bias [B, K]`` is the
    additive key bias (0 = a real key), turned into a mask (or, for cuDNN, key lengths)."""
    valid = bias == 0.0
    if impl == "cudnn" and cudnn_usable(q.dtype):
        # cuDNN's padding mask: the first ``length`` keys of each sequence are real (at least one).
        lengths = jnp.maximum(valid.sum(-1, dtype=jnp.int32), 1)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
        )
    return jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :], scale=scale)


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

    def __call__(self, x, key_bias, attention: str = "xla"):
        w = self.qkv.kernel[...].astype(x.dtype)
        if attention != "xla":
            qkv = jnp.einsum("bnd,dthk->tbnhk", x, w)
            if self.qkv.bias is not None:
                qkv = qkv + self.qkv.bias[...].astype(x.dtype)[:, None, None, :, :]
            qkv = constrain(qkv, (None,) + _LENGTH_MAJOR)
            out = _attend_fused(qkv[0], qkv[1], qkv[2], key_bias, self.scale, attention)
            proj = self.proj.kernel[...].astype(out.dtype)
            return jnp.einsum("bnhk,hkd->bnd", out, proj) + self.proj.bias[...].astype(out.dtype)
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


NORM_STYLES = ("pre", "post")


class Block(nnx.Module):
    """Self-attention block in one of two layouts (``norm_style``; the parameters and their names are the same):

    - ``"pre"`` (ATST, ASiT, ViT; data2vec 2.0's ``layer_norm_first=True``):
      ``x + DropPath(Attn(LN1(x)))``, then ``x + DropPath(MLP(LN2(x)))``;
    - ``"post"`` (EAT; data2vec 2.0's ``AltBlock`` with ``layer_norm_first=False``):
      ``x = LN1(x + DropPath(Attn(x)))``, then ``LN2(x + DropPath(MLP(x)))``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        qkv_bias: bool = False,
        norm_style: str = "pre",
        rngs: nnx.Rngs,
    ):
        if norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style must be pre or post, got {norm_style!r}")
        self.norm_style = norm_style
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, rngs=rngs)

    def __call__(self, x, key_bias, rate, key, train: bool, attention: str = "xla"):
        return self.with_ffn(x, key_bias, rate, key, train, attention)[0]

    def with_ffn(self, x, key_bias, rate, key, train: bool, attention: str = "xla"):
        """``(block output, feed-forward branch)``, the branch being data2vec 2.0 / EAT's target: pre-norm,
        ``MLP(LN2(x))`` after its drop-path, before the residual add; post-norm, EAT's ``t = MLP(LN1(·))``,
        before its drop-path and the residual add (without drop-path, as in a teacher, before and after are
        the same). XLA drops the second output where only the first is used."""
        if train:
            k1, k2 = jax.random.split(key)
        if self.norm_style == "post":
            y = self.attn(x, key_bias, attention)
            if train:
                y = drop_path(y, rate, k1)
            x = self.norm1(x + y)
            t = self.mlp(x)
            y = drop_path(t, rate, k2) if train else t
            return self.norm2(x + y), t
        y = self.attn(self.norm1(x), key_bias, attention)
        if train:
            y = drop_path(y, rate, k1)
        x = x + y
        y = self.mlp(self.norm2(x))
        if train:
            y = drop_path(y, rate, k2)
        return x + y, y


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
