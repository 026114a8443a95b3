"""The ATST "FrameAST" encoder family in Flax NNX (spec/methods.md §0): a patch stem + a transformer trunk.

Input is a normalised log-mel ``[B, n_mels, T]``. The stem (``atst_jax.models.stems``, chosen by
``EncoderConfig.stem``) turns it into embedded tokens ``[B, N(+1), D]``: ``frame`` is ATST's (all mel bins ×
4 frames per token, learned positions, slot 0 unused by ATST-Frame and taken by ATST-Clip's CLS token);
``patch2d`` is the ViT-style 16×16 patch stem of ASiT / EAT / AaSP (time-major tokens, learned or fixed
2-D sin-cos positions). Masked tokens take a learned ``mask_embed`` after the projection and before the
positions. The trunk is pre-norm blocks (exact GELU, LayerNorm eps 1e-6, qkv bias off for ATST, on for
ASiT, −10000 on padded keys) and a final LayerNorm.

``EncoderConfig.norm_style="post"`` is EAT's trunk instead (data2vec 2.0's ``layer_norm_first=False``): a
LayerNorm ``embed_norm`` on the embedded tokens (positions added, CLS in front) as the trunk's first step,
post-norm blocks (``models/attention.Block``: ``x = LN1(x + Attn(x))``, then ``LN2(x + MLP(x))``) and no
final LayerNorm: ``norm`` is a parameter-free identity, so everything that reads "final-normed tokens"
(``trunk``'s output, ``intermediate_features``, ``inference.block_features``, the probes and the health
monitors) reads the blocks' outputs as they are, which the blocks' own ``norm2`` has normalised — the
features EAT's encoder returns. The parameter tree then has ``embed_norm`` and no ``norm``; the pre-norm
tree is unchanged.

``trunk(collect_layers=...)`` also returns one stack per block: the blocks' outputs, or (``"ffn"``) their
feed-forward outputs before the residual add, which data2vec 2.0 / EAT / AaSP average into teacher targets.

``__call__`` is ``embed`` then ``trunk``. ``trunk`` also runs on any ``[B, K, D]`` set of already-embedded
tokens, so methods that drop masked tokens (data2vec 2.0 / EAT / AaSP) take each copy's visible tokens from
``embed_visible`` (the crop embedded once, the tokens keeping the positions they were given; an AaPE branch
computed per copy from what that copy keeps) and encode only those.

The blocks' parameters are stacked on a leading ``layers`` axis and run under ``jax.lax.scan`` by default:
on XLA:CPU the backward of an unrolled 12-block encoder is ~2× slower, and scan keeps compile time flat in
depth. ``scan_layers=False`` runs the same stacked parameters in a Python loop, so checkpoints are identical
either way.

For ``stem="frame"`` the parameter tree (names, shapes, and the order of random draws, hence the values
for a given key) is ATST's: ``patch_embed``, ``mask_embed``, ``pos_embed``, ``cls_token`` (Clip only),
``blocks``, ``norm`` — existing checkpoints and the PyTorch export depend on it (tests/test_model.py
pins it with a golden hash). ``norm_style="post"`` has ``embed_norm`` in place of ``norm`` and the same
draws.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax import knobs
from atst_jax.models.aape import AapeConfig, make_aape
from atst_jax.models.attention import (  # noqa: F401
    ATTENTION_IMPLS,
    NORM_STYLES,
    PAD_LOGIT,
    Attention,
    Block,
    Mlp,
    drop_path,
    key_bias,
)
from atst_jax.models.layers import Identity, LayerNorm
from atst_jax.models.stems import POS_EMBEDS, STEMS, make_stem
from atst_jax.sharding import ConfigError, constrain

RESIDUAL = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    n_mels: int = 64
    patch_w: int = 4  # frame stem: frames per token
    num_pos: int = 251  # learned pos_embed slots (250 tokens of a 10 s crop + the unused/CLS slot 0)
    drop_path: float = 0.1
    use_cls: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = True
    remat: str = "none"  # none | full | save_dots
    stem: str = "frame"  # frame (ATST) | patch2d (ASiT / EAT / AaSP)
    patch_size: tuple[int, int] = (16, 16)  # patch2d: (time, mel)
    pos_embed: str = "learned"  # learned | sincos2d (patch2d only)
    qkv_bias: bool = False  # ASiT's ViT has a qkv bias; ATST has none
    # Block layout: pre (ATST / ASiT / ViT: LayerNorm before attention and MLP, a final LayerNorm ``norm``) |
    # post (EAT: a LayerNorm ``embed_norm`` on the embedded tokens, LayerNorm after each residual add, no
    # final norm; see the module docstring).
    norm_style: str = "pre"
    # Self-attention implementation (models/attention.py): xla | dot_product_attention | cudnn. A compute
    # choice only: the parameters and checkpoints are the same for all three.
    attention: str = "xla"
    # AaPE (models/aape.py): None = off; an ``AapeConfig`` (or a mapping of its fields, ``model.aape``) adds
    # the aliasing-aware branch to the stem above. Its parameters live under ``aape``; without it the
    # parameter tree is unchanged.
    aape: AapeConfig | None = None

    # Allowed values, checked before anything compiles (atst_jax.knobs).
    RANGES: ClassVar[dict[str, str]] = {
        "width": "[1, inf)",
        "depth": "[1, inf)",
        "heads": "[1, inf)",
        "mlp_ratio": "(0, inf)",
        "n_mels": "[1, inf)",
        "patch_w": "[1, inf)",
        "num_pos": "[1, inf)",
        "drop_path": "[0, 1)",
        "patch_size": "[1, inf)",
    }

    def __post_init__(self):
        object.__setattr__(self, "aape", AapeConfig.coerce(self.aape))
        # Configs arrive as ConfigDicts / JSON, where tuples become lists; the config must stay hashable
        # (it is static metadata of the module).
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        knobs.check(self, "model")
        if self.stem not in STEMS:
            raise ValueError(f"model.stem must be one of {'|'.join(STEMS)}, got {self.stem!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"model.pos_embed must be one of {'|'.join(POS_EMBEDS)}, got {self.pos_embed!r}")
        if self.stem == "frame" and self.pos_embed != "learned":
            raise ValueError(
                f"model.pos_embed={self.pos_embed!r} needs stem='patch2d'; the frame stem is learned only"
            )
        if self.stem == "patch2d" and (len(self.patch_size) != 2 or self.n_mels % self.patch_size[1]):
            raise ValueError(
                f"model.patch_size {self.patch_size} must be (time, mel) with a mel size dividing n_mels={self.n_mels}"
            )
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} is not divisible by model.heads {self.heads}")
        if self.aape is not None:
            token_bins = self.patch_size[1] if self.stem == "patch2d" else self.n_mels
            if self.n_mels % self.aape.subband_bins or token_bins % self.aape.subband_bins:
                raise ValueError(
                    f"model.aape.subband_bins={self.aape.subband_bins} must divide n_mels={self.n_mels} and the "
                    f"{token_bins} mel bins of a token"
                )
        if self.norm_style not in NORM_STYLES:
            raise ConfigError(
                f"model.norm_style must be one of {'|'.join(NORM_STYLES)}, got {self.norm_style!r}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"model.attention must be one of {'|'.join(ATTENTION_IMPLS)}, got {self.attention!r}"
            )

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


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class FrameAST(nnx.Module):
    """Patch stem (``cfg.stem``) + transformer trunk; see the module docstring. ``Encoder`` is the same class."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Draw order (checkpoint parity): stem (patch kernel, mask, positions, CLS), then one key split into
        # per-block keys, then the final norm (no draws; nor has the post-norm embed_norm).
        self.stem.init_params(self, rngs)
        keys = jax.random.split(rngs.params(), cfg.depth)
        self.blocks = nnx.vmap(
            lambda k: Block(
                cfg.width,
                cfg.heads,
                cfg.mlp_dim,
                qkv_bias=cfg.qkv_bias,
                norm_style=cfg.norm_style,
                rngs=nnx.Rngs(params=k),
            ),
            in_axes=0,
            out_axes=0,
        )(keys)
        if cfg.norm_style == "post":  # EAT: a LayerNorm on the embedded tokens, no final norm
            self.embed_norm = LayerNorm(cfg.width)
            self.norm = Identity()
        else:
            self.norm = LayerNorm(cfg.width)  # "norm_frame" (Frame) / "norm" (Clip) in the PyTorch export
        if cfg.aape is not None:  # drawn last: the other parameters equal those of the plain encoder
            self.aape = make_aape(cfg, rngs)

    # --- stem: tokens -----------------------------------------------------------------------------------
    @property
    def stem(self):
        """The stem's rule object (``FrameStem`` / ``PatchStem2D``), rebuilt from ``cfg``: it holds no state."""
        return make_stem(self.cfg)

    @property
    def n_prefix(self) -> int:
        """Tokens in front of the patch tokens: 1 with a CLS token, else 0."""
        return self.stem.n_prefix

    def num_tokens(self, frames: int) -> int:
        """Patch tokens of a crop of ``frames`` frames (CLS not counted)."""
        return self.stem.num_tokens(frames)

    def token_lengths(self, length):
        """Valid patch tokens per example from valid frames ``length [B]`` (CLS not counted)."""
        return self.stem.token_lengths(length)

    def patchify(self, spec):
        """``[B, F, T] -> [B, N, patch_dim]`` in the stem's token and feature order."""
        return self.stem.patchify(spec)

    def unpatchify(self, patches):
        """Inverse of ``patchify``: ``[B, N, patch_dim] -> [B, F, T']`` (``T'`` = the frames the tokens cover)."""
        return self.stem.unpatchify(patches)

    def token_positions(self, n: int, dtype=jnp.float32):
        """Positional embeddings ``[1, n, D]`` of patch tokens ``0..n-1`` (what ``embed`` adds to them)."""
        return self.stem.token_positions(self, n, dtype)

    def embed(self, spec, mask=None, length=None):
        """Patch projection, mask token substitution, positions (and CLS). Returns ``[B, N(+1), D]``.
        ``length`` (valid frames) matters only to an AaPE branch."""
        return self.stem.embed(self, spec, mask, length)

    def embed_visible(self, spec, length, vis):
        """The tokens M copies of each clip keep, ``vis [B, M, V]`` (patch-token indices) → ``[B·M, n_prefix +
        V, D]`` (clip-major; the CLS token in front of each copy): the patch projection once per clip, an AaPE
        branch once per copy from that copy's visible tokens only (``stems._Stem.embed_visible``)."""
        return self.stem.embed_visible(self, spec, length, vis)

    def valid_mask(self, length, n: int):
        """``[B, n]`` bool over an embedded sequence of ``n`` tokens (CLS included): True = a real token."""
        valid = self.token_lengths(length) + self.n_prefix
        return jnp.arange(n)[None, :] < valid[:, None]

    # --- trunk: blocks ----------------------------------------------------------------------------------
    def trunk(self, x, valid=None, *, train: bool = False, key=None, collect_layers: bool | str = False):
        """Runs the blocks and the final norm on embedded tokens ``x [B, K, D]`` (positions already added;
        post-norm: ``embed_norm`` first, and the final norm is the identity).

        ``K`` is any token count: the full sequence, or a gathered subset of it. ``valid [B, K]`` (bool)
        marks the real tokens; the others are padding, excluded as keys by a −10000 logit bias (None = all
        real). With ``train`` and a ``key``, drop-path is active. Returns final-normed tokens
        ``[B, K, D]``; with ``collect_layers`` also one ``[L, B, K, D]`` stack per block:

        - ``True`` or ``"block"``: each block's output (the residual stream after the block, before the
          final norm; post-norm: after the block's ``norm2``);
        - ``"ffn"``: each block's feed-forward output before the residual add (data2vec 2.0 / EAT's teacher
          targets; ``Block.with_ffn``): pre-norm ``fc2(GELU(fc1(LN2(h))))`` after its drop-path; post-norm
          EAT's ``t = fc2(GELU(fc1(LN1(h + attn))))``, before its drop-path.
        """
        collect = _collect_kind(collect_layers)
        cfg = self.cfg
        if cfg.norm_style == "post":
            x = self.embed_norm(x)
        x = constrain(x, RESIDUAL)
        if valid is None:
            valid = jnp.ones(x.shape[:2], bool)
        bias = key_bias(valid)
        rates = jnp.asarray(np.linspace(0.0, cfg.drop_path, cfg.depth), jnp.float32)
        keys = jax.random.split(key if key is not None else jax.random.key(0), cfg.depth)
        train = bool(train and key is not None and cfg.drop_path > 0)

        graphdef, stacked = nnx.split(self.blocks)

        def body(h, layer):
            params, rate, k = layer
            block = nnx.merge(graphdef, params)
            if collect == "ffn":
                h, ffn = block.with_ffn(h, bias, rate, k, train, cfg.attention)
                return constrain(h, RESIDUAL), ffn
            h = constrain(block(h, bias, rate, k, train, cfg.attention), RESIDUAL)
            return h, (h if collect else None)

        if cfg.remat != "none":
            if cfg.remat not in _REMAT_POLICIES:
                raise ValueError(f"model.remat must be one of none|full|save_dots, got {cfg.remat!r}")
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            # One traced block for all layers: flat compile time in depth, and a faster backward on CPU.
            x, layers = jax.lax.scan(body, x, (stacked, rates, keys))
        else:
            outs = []
            for i in range(cfg.depth):
                x, y = body(x, (jax.tree.map(lambda a, i=i: a[i], stacked), rates[i], keys[i]))
                outs.append(y)
            layers = jnp.stack(outs) if collect else None
        out = self.norm(x)
        return (out, layers) if collect else out

    def __call__(
        self, spec, length, mask=None, *, train: bool = False, key=None, collect_layers: bool | str = False
    ):
        """Encodes ``spec [B, F, T]`` with valid frames ``length [B]``: ``trunk(embed(spec, mask))``.

        ``mask [B, N]`` (bool) replaces those tokens by ``mask_embed``. With ``train`` and a ``key``,
        drop-path is active. Returns final-normed tokens ``[B, N(+1), D]`` (post-norm: the last block's
        output); with ``collect_layers`` also every block's output ``[L, B, N(+1), D]`` (``True`` /
        ``"block"``: before the final norm; ``"ffn"``: the feed-forward outputs before the residual add, see
        ``trunk``).
        """
        x = self.embed(spec, mask, length)
        valid = self.valid_mask(length, x.shape[1])
        return self.trunk(x, valid, train=train, key=key, collect_layers=collect_layers)

    def intermediate_features(self, spec, length, n: int = 1):
        """The official ``get_intermediate_layers(scene=False)``: the last ``n`` blocks' outputs, each through
        the final norm (post-norm: as they are), concatenated on channels: ``[B, N, n * D]`` (CLS removed)."""
        _, layers = self(spec, length, collect_layers=True)
        feats = [self.norm(layers[i])[:, self.n_prefix :] for i in range(self.cfg.depth - n, self.cfg.depth)]
        return jnp.concatenate(feats, axis=-1)


Encoder = FrameAST  # the generic name: the same class builds every stem


def _collect_kind(collect_layers) -> str | None:
    """``collect_layers`` → None (collect nothing), ``"block"`` or ``"ffn"``."""
    if not isinstance(collect_layers, str):
        return "block" if collect_layers else None
    if collect_layers in ("block", "ffn"):
        return collect_layers
    raise ValueError(f"collect_layers must be False, True, 'block' or 'ffn', got {collect_layers!r}")


def count_params(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
