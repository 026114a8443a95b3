"""The ATST "FrameAST" encoder in Flax NNX (spec/methods.md §0).

Input is a normalised log-mel ``[B, n_mels, T]``. Frames are cut to a multiple of ``patch_w``; each token is
all mel bins × ``patch_w`` frames, flattened mel-major (index ``mel * patch_w + frame_offset``) and projected
by a Linear. Masked tokens take a learned ``mask_embed`` after the projection and before the positions.
Positions are learned, slot 0 unused by ATST-Frame (kept for checkpoint parity); ATST-Clip's ``cls_token``
takes slot 0. Pre-norm blocks, exact GELU, LayerNorm eps 1e-6, qkv without bias, −10000 on padded keys.

The blocks' parameters are stacked on a leading ``layers`` axis and run under ``jax.lax.scan`` by default:
on XLA:CPU the backward of an unrolled 12-block encoder is ~2× slower, and scan keeps compile time flat in
depth. ``scan_layers=False`` runs the same stacked parameters in a Python loop, so checkpoints are identical
either way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax.models.layers import LayerNorm, Linear, gelu_exact, trunc_normal
from atst_jax.sharding import constrain

RESIDUAL = ("act_batch", "act_length", "act_embed")

PAD_LOGIT = -10000.0  # additive key mask of the official code (not -inf: fully padded rows stay finite)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    n_mels: int = 64
    patch_w: int = 4
    num_pos: int = 251  # pos_embed slots (250 tokens of a 10 s crop + the unused/CLS slot 0)
    drop_path: float = 0.1
    use_cls: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = True
    remat: str = "none"  # none | full | save_dots

    @classmethod
    def from_config(cls, model_config) -> EncoderConfig:
        """The encoder fields of a run config's ``model`` section (a ConfigDict or a plain dict, e.g. the
        JSON config saved in a checkpoint); other keys of that section are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(model_config).items() if k in fields})

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


class Attention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h, hd, d = cfg.heads, cfg.head_dim, cfg.width
        # qkv kernel kept as [D, 3, H, hd] so tensor parallelism splits whole heads; the PyTorch export
        # reshapes it to the official [3D, D] weight (rows [q; k; v], head-major).
        self.qkv = Linear(d, (3, h, hd), axes=("embed", None, "heads", "kv"), use_bias=False, rngs=rngs)
        self.proj = Linear((h, hd), d, axes=("heads", "kv", "embed"), use_bias=True, rngs=rngs)
        self.scale = hd**-0.5

    def __call__(self, x, key_bias):
        # Heads-major layout [3, B, H, N, hd] straight out of the projection: on XLA:CPU the batched
        # matmuls below run ~2.5x faster in this layout than with heads in the middle ([B, N, H, hd]).
        w = self.qkv.kernel[...].astype(x.dtype)
        qkv = constrain(
            jnp.einsum("bnd,dthk->tbhnk", x, w), (None, "act_batch", "act_heads", "act_length", None)
        )
        q, k, v = qkv[0] * jnp.asarray(self.scale, x.dtype), qkv[1], qkv[2]
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) + key_bias[:, None, None, :]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        proj = self.proj.kernel[...].astype(out.dtype)
        return jnp.einsum("bhnk,hkd->bnd", out, proj) + self.proj.bias[...].astype(out.dtype)


class Mlp(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Linear(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.fc2(constrain(gelu_exact(self.fc1(x)), ("act_batch", "act_length", "act_mlp")))


def drop_path(x, rate, key):
    """Per-sample stochastic depth, as timm/official: keep with prob 1-rate, scale kept paths by 1/(1-rate)."""
    keep = 1.0 - rate
    u = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
    mask = jnp.floor(keep + u)
    return x * (mask / keep).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.width)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.width)
        self.mlp = Mlp(cfg, rngs=rngs)

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


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class FrameAST(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = Linear(cfg.n_mels * cfg.patch_w, d, axes=("patch", "embed"), rngs=rngs)
        self.mask_embed = nnx.Param(trunc_normal(rngs.params(), (1, 1, d)), axes=(None, None, "embed"))
        self.pos_embed = nnx.Param(
            trunc_normal(rngs.params(), (1, cfg.num_pos, d)), axes=(None, None, "embed")
        )
        if cfg.use_cls:
            self.cls_token = nnx.Param(trunc_normal(rngs.params(), (1, 1, d)), axes=(None, None, "embed"))
        else:
            self.cls_token = None
        keys = jax.random.split(rngs.params(), cfg.depth)
        self.blocks = nnx.vmap(lambda k: Block(cfg, rngs=nnx.Rngs(params=k)), in_axes=0, out_axes=0)(keys)
        self.norm = LayerNorm(d)  # "norm_frame" (Frame) / "norm" (Clip) in the PyTorch export

    # --- tokens -----------------------------------------------------------------------------------------
    def num_tokens(self, frames: int) -> int:
        return frames // self.cfg.patch_w

    def patchify(self, spec):
        """``[B, F, T] -> [B, N, F * patch_w]`` with the mel-major flattening of the official PatchEmbed_v2."""
        b, f, t = spec.shape
        pw = self.cfg.patch_w
        n = t // pw
        x = spec[:, :, : n * pw].reshape(b, f, n, pw)
        return x.transpose(0, 2, 1, 3).reshape(b, n, f * pw)

    def token_lengths(self, length):
        """Valid tokens per example from valid frames (partial patches at the end are dropped)."""
        return (length - length % self.cfg.patch_w) // self.cfg.patch_w

    def embed(self, spec, mask=None):
        """Patch projection, mask token substitution, positions (and CLS). Returns ``[B, N(+1), D]``."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = self.patch_embed(self.patchify(spec.astype(dtype)))
        n = x.shape[1]
        if n + 1 > self.cfg.num_pos:
            raise ValueError(f"{n} tokens exceed the {self.cfg.num_pos - 1} positional slots of this encoder")
        if mask is not None:
            x = jnp.where(mask[..., None], self.mask_embed[...].astype(dtype), x)
        pos = self.pos_embed[...].astype(dtype)
        x = x + pos[:, 1 : n + 1]
        if self.cls_token is not None:
            cls = (self.cls_token[...] + self.pos_embed[:, :1]).astype(dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)
        return x

    # --- blocks -----------------------------------------------------------------------------------------
    def __call__(
        self, spec, length, mask=None, *, train: bool = False, key=None, collect_layers: bool = False
    ):
        """Encodes ``spec [B, F, T]`` with valid frames ``length [B]``.

        ``mask [B, N]`` (bool) replaces those tokens by ``mask_embed``. With ``train`` and a ``key``,
        drop-path is active. Returns final-normed tokens ``[B, N(+1), D]``; with ``collect_layers`` also
        every block's output ``[L, B, N(+1), D]`` (before the final norm).
        """
        cfg = self.cfg
        x = constrain(self.embed(spec, mask), RESIDUAL)
        n_prefix = 1 if self.cls_token is not None else 0
        valid = self.token_lengths(length) + n_prefix
        key_bias = jnp.where(jnp.arange(x.shape[1])[None, :] < valid[:, None], 0.0, PAD_LOGIT)
        rates = jnp.asarray(np.linspace(0.0, cfg.drop_path, cfg.depth), jnp.float32)
        keys = jax.random.split(key if key is not None else jax.random.key(0), cfg.depth)
        train = bool(train and key is not None and cfg.drop_path > 0)

        graphdef, stacked = nnx.split(self.blocks)

        def body(h, layer):
            params, rate, k = layer
            h = constrain(nnx.merge(graphdef, params)(h, key_bias, rate, k, train), RESIDUAL)
            return h, (h if collect_layers else None)

        if cfg.remat != "none":
            if cfg.remat not in _REMAT_POLICIES:
                raise ValueError(f"model.remat must be one of none|full|save_dots, got {cfg.remat!r}")
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            x, layers = jax.lax.scan(body, x, (stacked, rates, keys))
        else:
            outs = []
            for i in range(cfg.depth):
                x, y = body(x, (jax.tree.map(lambda a, i=i: a[i], stacked), rates[i], keys[i]))
                outs.append(y)
            layers = jnp.stack(outs) if collect_layers else None
        out = self.norm(x)
        return (out, layers) if collect_layers else out

    def intermediate_features(self, spec, length, n: int = 1):
        """The official ``get_intermediate_layers(scene=False)``: the last ``n`` blocks' outputs, each through
        the final norm, concatenated on channels: ``[B, N, n * D]`` (CLS removed)."""
        _, layers = self(spec, length, collect_layers=True)
        n_prefix = 1 if self.cls_token is not None else 0
        feats = [self.norm(layers[i])[:, n_prefix:] for i in range(self.cfg.depth - n, self.cfg.depth)]
        return jnp.concatenate(feats, axis=-1)


def count_params(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
