"""Parts of data2vec 2.0 / EAT-style masked prediction that any method can compose (AaSP uses all three):

- ``layer_targets``: the teacher's targets — the top-k per-block outputs (the blocks' outputs, or with
  ``FrameAST(collect_layers="ffn")`` their feed-forward outputs before the residual add, as data2vec 2.0 /
  EAT), each instance-normalised over the tokens of a clip (per channel), averaged, then a LayerNorm without
  affine parameters per token;
- ``CrossPredictor``: a cross-attention decoder whose queries are positional embeddings of the positions to
  predict and whose keys/values are the visible student tokens; queries never attend to each other, so one
  query's answer depends only on its position and the visible set;
- ``multi_view_info_nce``: InfoNCE over several views per clip, the other views of the same clip positive and
  every view of another clip negative (the multi-positive / supervised-contrastive form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax.models.attention import CrossBlock
from atst_jax.models.layers import LayerNorm, Linear


def instance_norm(x, weights=None, eps: float = 1e-5):
    """Normalise ``x [B, N, D]`` per example and channel over the tokens (``F.instance_norm`` on
    ``[B, D, N]``, no affine); ``weights [B, N]`` (1 = a real token) keeps padding out of the statistics."""
    x = x.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(x.shape[:2], jnp.float32)
    w = weights.astype(jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    mean = jnp.sum(x * w, axis=1, keepdims=True) / count
    var = jnp.sum(jnp.square(x - mean) * w, axis=1, keepdims=True) / count
    return (x - mean) * jax.lax.rsqrt(var + eps)


def layer_norm_plain(x, eps: float = 1e-6):
    """LayerNorm over the last axis without affine parameters (float32)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def layer_targets(
    layers, top_k: int, weights=None, *, instance_norm_layers=True, final_norm=True, final_norm_eps=1e-6
):
    """Targets ``[B, N, D]`` from per-block outputs ``layers [L, B, N, D]`` (patch tokens only): the mean of
    the last ``top_k`` layers, each instance-normalised (``instance_norm_layers``, eps 1e-5), then a plain
    LayerNorm per token (``final_norm``, eps ``final_norm_eps``; data2vec 2.0 / EAT use PyTorch's
    ``F.layer_norm`` default, 1e-5). Returned under ``stop_gradient``."""
    top = layers[-top_k:]
    if instance_norm_layers:
        top = jax.vmap(lambda y: instance_norm(y, weights))(top)
    y = jnp.mean(top.astype(jnp.float32), axis=0)
    if final_norm:
        y = layer_norm_plain(y, final_norm_eps)
    return jax.lax.stop_gradient(y)


class CrossPredictor(nnx.Module):
    """``queries [B, Q, D]`` (positional embeddings of the positions to predict) → ``Linear(D → d)`` →
    ``depth`` × ``CrossBlock`` (cross-attention to ``kv [B, K, D]`` then MLP) → LayerNorm → ``Linear(d → D)``."""

    def __init__(self, width: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, *, rngs):
        self.depth = int(depth)
        self.query_proj = Linear(width, dim, axes=("embed", "mlp"), rngs=rngs)
        # Blocks stacked on a leading ``layers`` axis (as the encoder's): plain string-keyed checkpoints.
        keys = jax.random.split(rngs.params(), self.depth)
        self.blocks = nnx.vmap(
            lambda k: CrossBlock(dim, width, heads, mlp_ratio, qkv_bias=True, rngs=nnx.Rngs(params=k)),
            in_axes=0,
            out_axes=0,
        )(keys)
        self.norm = LayerNorm(dim, axis_name="mlp")
        self.head = Linear(dim, width, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, queries, kv, kv_valid=None):
        q = self.query_proj(queries)
        graphdef, stacked = nnx.split(self.blocks)
        for i in range(self.depth):  # a few blocks: unrolled (XLA's cost analysis counts each)
            q = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))(q, kv, kv_valid)
        return self.head(self.norm(q))


def masked_mean(x, weights):
    """Mean of ``x [R, K, E]`` over the rows with weight 1 along ``K`` → ``[R, E]`` (float32)."""
    w = weights.astype(jnp.float32)[..., None]
    return jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def multi_view_info_nce(emb, views: int, temperature: float):
    """InfoNCE over ``emb [C·V, E]`` (clip-major: rows ``c·V … c·V + V − 1`` are the ``V`` views of clip ``c``),
    L2-normalised here. For anchor ``i`` with positives ``P(i)`` (the other views of its clip) and the
    candidates ``A(i)`` = every other row:

        L_i = −(1 / |P(i)|) Σ_{p ∈ P(i)} log( exp(s_ip / τ) / Σ_{a ∈ A(i)} exp(s_ia / τ) ),   s = cosine,

    averaged over the anchors. Needs ``V ≥ 2``."""
    z = l2_normalize(emb)
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    eye = jnp.eye(n, dtype=bool)
    clip = jnp.arange(n) // views
    positive = (clip[:, None] == clip[None, :]) & ~eye
    logits = jnp.where(eye, -jnp.inf, logits)
    log_prob = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
    log_prob = jnp.where(positive, log_prob, 0.0)
    return -jnp.mean(jnp.sum(log_prob, axis=1) / (views - 1))
