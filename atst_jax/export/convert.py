"""JAX parameter trees ↔ the official PyTorch state_dict layout (spec/torch_export.md).

Everything here is pure array reshuffling: NumPy (or jax) arrays in, arrays out, no torch import. The
functions use only array *methods* (``reshape``, ``transpose``, ``astype``), so they also run under
``jax.eval_shape`` on abstract parameters — that is how the tests list the 85M-parameter base layout
without allocating it.

JAX side (stacked blocks, leading axis L)             PyTorch side (one entry per block i)
  patch_embed/kernel [256, D]                           patch_embed.patch_embed.weight [D, 256]
  blocks/attn/qkv/kernel [L, D, 3, H, hd]               blocks.i.attn.qkv.weight [3·H·hd, D]  rows [q; k; v]
  blocks/attn/proj/kernel [L, H, hd, D]                 blocks.i.attn.proj.weight [D, H·hd]
  blocks/mlp/fc{1,2}/kernel [L, in, out]                blocks.i.mlp.fc{1,2}.weight [out, in]
  blocks/norm{1,2}/{scale,bias} [L, D]                  blocks.i.norm{1,2}.{weight,bias}
  norm/{scale,bias}                                     norm_frame.* (ATST-Frame) / norm.* (ATST-Clip)

2-D patch ViT (``stem="patch2d"``; ASiT's ``vision_transformer.py`` names, :func:`vit_to_torch`):
  patch_embed/kernel [p_t·p_f, D]                       patch_embed.proj.weight [D, 1, p_t, p_f] (Conv2d)
  blocks/attn/qkv/bias [L, 3, H, hd]                    blocks.i.attn.qkv.bias [3·H·hd]
  cls_token, pos_embed, norm                            cls_token, pos_embed, norm.*  (no mask_embed)
  embed_norm (``norm_style="post"``, EAT; no norm)      embed_norm.*  (no norm.*; torch_vit's post-norm ViT)

A post-norm encoder (``EncoderConfig.norm_style="post"``) exports in the ViT layout only: the ATST FrameAST
layouts are the official pre-norm ones, and :func:`encoder_to_torch` refuses it.

Flattening ``[D, 3, H, hd]`` to ``[D, 3·H·hd]`` in C order puts q/k/v outermost, then heads, then the head
dimension, which is exactly the official row order after the transpose (head h of q = rows h·hd … h·hd+hd−1).
The same holds for the proj input ``(H, hd) → H·hd``: PyTorch concatenates head outputs head-major.
"""

from __future__ import annotations

import re

import numpy as np

# Shared with the inference code (which builds encoders from parameters): heads = width // 64 by default.
from atst_jax.inference import infer_heads

# Per block: (torch name, JAX path under blocks/) for the parameters that are a plain copy or a transpose.
_BLOCK_VECTORS = (
    ("norm1.weight", ("norm1", "scale")),
    ("norm1.bias", ("norm1", "bias")),
    ("attn.proj.bias", ("attn", "proj", "bias")),
    ("norm2.weight", ("norm2", "scale")),
    ("norm2.bias", ("norm2", "bias")),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias")),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias")),
)
_BLOCK_LINEARS = (
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel")),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel")),
)
# The order of a block's 11 tensors in the official state_dict (module registration order).
_BLOCK_ORDER = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _t(x):
    """PyTorch ``Linear.weight`` [out, in] ↔ Flax kernel [in, out]."""
    return x.transpose(1, 0)


def is_clip(enc_params) -> bool:
    """ATST-Clip encoders carry a ``cls_token``; ATST-Frame's is absent (or ``None``)."""
    return enc_params.get("cls_token") is not None


def norm_style(enc_params) -> str:
    """``"post"`` for an EAT-style post-norm encoder (an ``embed_norm``, no final ``norm``), else ``"pre"``."""
    return "post" if enc_params.get("embed_norm") is not None else "pre"


def has_qkv_bias(enc_params) -> bool:
    """A qkv bias (``blocks/attn/qkv/bias``): the official ViT layout has one, ATST's FrameAST none."""
    return enc_params["blocks"]["attn"]["qkv"].get("bias") is not None


def _blocks_to_torch(blocks, order) -> dict:
    """Stacked JAX blocks → ``{"blocks.{i}.<name>": …}`` for the names of ``order`` (official order)."""
    qkv = blocks["attn"]["qkv"]  # kernel [L, D, 3, H, hd], bias [L, 3, H, hd]
    depth, d = qkv["kernel"].shape[0], qkv["kernel"].shape[1]
    proj = blocks["attn"]["proj"]["kernel"]  # [L, H, hd, D]
    vectors = dict(_BLOCK_VECTORS)
    linears = dict(_BLOCK_LINEARS)
    out = {}
    for i in range(depth):
        for name in order:
            if name == "attn.qkv.weight":
                value = _t(qkv["kernel"][i].reshape(d, -1))
            elif name == "attn.qkv.bias":
                value = qkv["bias"][i].reshape(-1)  # (3, H, hd) in C order = rows [q; k; v], head-major
            elif name == "attn.proj.weight":
                value = _t(proj[i].reshape(-1, d))
            elif name in linears:
                value = _t(_get(blocks, linears[name])[i])
            else:
                value = _get(blocks, vectors[name])[i]
            out[f"blocks.{i}.{name}"] = value
    return out


def _blocks_from_torch(sd, depth: int, h: int, hd: int, *, qkv_bias: bool) -> dict:
    """Inverse of :func:`_blocks_to_torch`: ``blocks.{i}.*`` NumPy arrays → stacked JAX blocks."""
    d = h * hd

    def stack(fn):
        return np.stack([fn(i) for i in range(depth)])

    blocks = {}
    for name, path in _BLOCK_VECTORS:
        _set(blocks, path, stack(lambda i, n=name: sd[f"blocks.{i}.{n}"]))
    for name, path in _BLOCK_LINEARS:
        _set(blocks, path, stack(lambda i, n=name: _t(sd[f"blocks.{i}.{n}"])))
    _set(
        blocks,
        ("attn", "qkv", "kernel"),
        stack(lambda i: _t(sd[f"blocks.{i}.attn.qkv.weight"]).reshape(d, 3, h, hd)),
    )
    if qkv_bias:
        _set(
            blocks,
            ("attn", "qkv", "bias"),
            stack(lambda i: sd[f"blocks.{i}.attn.qkv.bias"].reshape(3, h, hd)),
        )
    _set(
        blocks,
        ("attn", "proj", "kernel"),
        stack(lambda i: _t(sd[f"blocks.{i}.attn.proj.weight"]).reshape(h, hd, d)),
    )
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------


def encoder_to_torch(enc_params) -> dict:
    """JAX encoder params (nested dict, blocks stacked) → official FrameAST state_dict (flat dict).

    138 entries for ATST-Frame; 139 for ATST-Clip (``cls_token`` and the final norm named ``norm.*``).
    Values are arrays of the input kind, laid out as PyTorch expects (not necessarily contiguous: writers
    call :func:`as_contiguous`).
    """
    p = enc_params
    blocks = p["blocks"]
    if norm_style(p) == "post":
        raise ValueError(
            "model.norm_style='post' (EAT's post-norm trunk) has no ATST FrameAST layout: only the 2-D patch "
            "ViT layout (vit_to_torch) exports it"
        )
    if has_qkv_bias(p):
        raise ValueError("this encoder has a qkv bias, which the ATST FrameAST layout lacks")
    clip = is_clip(p)

    out = {}
    if clip:
        out["cls_token"] = p["cls_token"]
    out["mask_embed"] = p["mask_embed"]
    out["pos_embed"] = p["pos_embed"]
    out["patch_embed.patch_embed.weight"] = _t(p["patch_embed"]["kernel"])
    out["patch_embed.patch_embed.bias"] = p["patch_embed"]["bias"]
    out.update(_blocks_to_torch(blocks, _BLOCK_ORDER))
    norm = "norm" if clip else "norm_frame"
    out[f"{norm}.weight"] = p["norm"]["scale"]
    out[f"{norm}.bias"] = p["norm"]["bias"]
    return out


def encoder_depth(sd) -> int:
    """Number of blocks in a flat encoder state_dict (``blocks.{i}.…`` keys)."""
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx:
        raise KeyError("no blocks.{i}.* keys: not a FrameAST encoder state_dict")
    if idx != set(range(len(idx))):
        raise KeyError(f"block indices are not contiguous from 0: {sorted(idx)}")
    return len(idx)


def torch_to_encoder(sd, heads: int | None = None) -> dict:
    """Official FrameAST state_dict (bare keys, arrays) → JAX encoder params (nested dict, blocks stacked).

    The number of heads cannot be read from the weights (qkv is ``[3D, D]`` for any head count); by default
    it is ``D // 64`` as in every official model. Raises ``KeyError`` naming missing or unexpected keys.
    An official ViT state_dict (:func:`is_vit_state_dict`) goes to :func:`torch_to_vit`.
    """
    if is_vit_state_dict(sd):
        return torch_to_vit(sd, heads)
    sd = {k: np.asarray(v) for k, v in sd.items()}
    depth = encoder_depth(sd)
    clip = "cls_token" in sd
    norm = "norm" if clip else "norm_frame"
    expected = set(encoder_keys(depth, clip=clip))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"not an ATST encoder state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    d = sd["mask_embed"].shape[-1]
    h = infer_heads(d, heads)
    hd = d // h

    out = {
        "mask_embed": sd["mask_embed"],
        "pos_embed": sd["pos_embed"],
        "patch_embed": {
            "kernel": _t(sd["patch_embed.patch_embed.weight"]),
            "bias": sd["patch_embed.patch_embed.bias"],
        },
        "norm": {"scale": sd[f"{norm}.weight"], "bias": sd[f"{norm}.bias"]},
    }
    if clip:
        out["cls_token"] = sd["cls_token"]
    out["blocks"] = _blocks_from_torch(sd, depth, h, hd, qkv_bias=False)
    return as_contiguous(out)


def encoder_keys(depth: int = 12, *, clip: bool = False) -> list[str]:
    """The official key names, in state_dict order: 138 for ATST-Frame (depth 12), 139 for ATST-Clip."""
    keys = (["cls_token"] if clip else []) + [
        "mask_embed",
        "pos_embed",
        "patch_embed.patch_embed.weight",
        "patch_embed.patch_embed.bias",
    ]
    keys += [f"blocks.{i}.{n}" for i in range(depth) for n in _BLOCK_ORDER]
    norm = "norm" if clip else "norm_frame"
    return keys + [f"{norm}.weight", f"{norm}.bias"]


# ----------------------------------------------------------------------------------------------------------
# 2-D patch ViT (ASiT, and AST-style fine-tuning code): the layout of ASiT's vision_transformer.py
# ----------------------------------------------------------------------------------------------------------

# A block of the official ViT: the ATST block plus the qkv bias (Linear(D, 3D, bias=True)).
_VIT_BLOCK_ORDER = _BLOCK_ORDER[:3] + ("attn.qkv.bias",) + _BLOCK_ORDER[3:]


def is_vit_state_dict(sd) -> bool:
    """The official ViT layout (``patch_embed.proj`` is a Conv2d) rather than ATST's FrameAST
    (``patch_embed.patch_embed`` is a Linear)."""
    return "patch_embed.proj.weight" in sd


def vit_keys(depth: int = 12, norm_style: str = "pre") -> list[str]:
    """The official ViT key names in ``state_dict`` order (parameters of the module itself first, then its
    children in registration order): 12 per block + 6 = 150 at depth 12. The classifier ``head`` is an
    ``nn.Identity`` (``num_classes=0``) and holds nothing. ``norm_style="post"`` (torch_vit's EAT-style
    layout): ``embed_norm.*`` after the patch projection and no final ``norm.*`` (the same count)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    if norm_style == "post":
        keys += ["embed_norm.weight", "embed_norm.bias"]
    keys += [f"blocks.{i}.{n}" for i in range(depth) for n in _VIT_BLOCK_ORDER]
    return keys + (["norm.weight", "norm.bias"] if norm_style == "pre" else [])


def vit_to_torch(enc_params, patch_size=(16, 16)) -> dict:
    """JAX 2-D patch encoder (``stem="patch2d"``, learned ``pos_embed``, CLS, qkv bias) → the official ViT
    ``state_dict`` (flat dict, :func:`vit_keys` order).

    The patch projection becomes ``patch_embed.proj.weight [D, 1, p_t, p_f]``: our kernel row ``dt·p_f + df``
    (the stem flattens each patch time-major) multiplies input pixel (time ``dt``, mel ``df``), which is the
    conv weight's ``[:, 0, dt, df]`` over an input ``[B, 1, T, n_mels]``. Both token orders are time-major
    (the conv output ``[B, D, T/p_t, n_mels/p_f]`` flattened), so ``pos_embed`` is copied as is.
    ``mask_embed`` is left out: the official ViT has none (a mask token is a training-time device).
    A post-norm encoder (``embed_norm``, no ``norm``) gives torch_vit's post-norm layout (``vit_keys(…,
    "post")``).
    """
    p = enc_params
    if p.get("cls_token") is None or p.get("pos_embed") is None:
        raise ValueError("the official ViT layout needs a cls_token and learned positions (pos_embed)")
    if not has_qkv_bias(p):
        raise ValueError("the official ViT layout has a qkv bias; this encoder has none")
    p_t, p_f = (int(x) for x in patch_size)
    kernel = p["patch_embed"]["kernel"]  # [p_t·p_f, D]
    if kernel.shape[0] != p_t * p_f:
        raise ValueError(f"patch kernel {tuple(kernel.shape)} does not fit patch_size {(p_t, p_f)}")
    out = {
        "cls_token": p["cls_token"],
        "pos_embed": p["pos_embed"],
        "patch_embed.proj.weight": _t(kernel).reshape(kernel.shape[1], 1, p_t, p_f),
        "patch_embed.proj.bias": p["patch_embed"]["bias"],
    }
    final = "embed_norm" if norm_style(p) == "post" else "norm"
    if final == "embed_norm":  # registered before the blocks in torch_vit (state_dict order)
        out["embed_norm.weight"] = p["embed_norm"]["scale"]
        out["embed_norm.bias"] = p["embed_norm"]["bias"]
    out.update(_blocks_to_torch(p["blocks"], _VIT_BLOCK_ORDER))
    if final == "norm":
        out["norm.weight"] = p["norm"]["scale"]
        out["norm.bias"] = p["norm"]["bias"]
    return out


def torch_to_vit(sd, heads: int | None = None) -> dict:
    """Official ViT ``state_dict`` (bare keys, arrays) → JAX encoder params for
    ``EncoderConfig(stem="patch2d", patch_size=(p_t, p_f), use_cls=True, qkv_bias=True, num_pos=…)``.

    ``mask_embed`` (a parameter of our encoder that the official ViT lacks) is returned as zeros; inference
    never uses it. Heads default to ``D // 64``. A classifier ``head.*`` (fine-tuned checkpoints) is ignored.
    ``embed_norm.*`` keys (torch_vit's post-norm layout) give a post-norm encoder's params (``embed_norm``, no
    ``norm``), for ``norm_style="post"``.
    Raises ``KeyError`` naming missing or unexpected keys, ``ValueError`` for more than one input channel.
    """
    sd = {k: np.asarray(v) for k, v in sd.items() if not k.startswith("head.")}
    depth = encoder_depth(sd)
    style = "post" if "embed_norm.weight" in sd else "pre"
    expected = set(vit_keys(depth, style))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"not an official ViT state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    weight = sd["patch_embed.proj.weight"]  # [D, C, p_t, p_f]
    d, chans, p_t, p_f = weight.shape
    if chans != 1:
        raise ValueError(f"patch_embed.proj has {chans} input channels; a spectrogram encoder has 1")
    h = infer_heads(d, heads)
    out = {
        "cls_token": sd["cls_token"],
        "pos_embed": sd["pos_embed"],
        "mask_embed": np.zeros((1, 1, d), sd["cls_token"].dtype),
        "patch_embed": {"kernel": _t(weight.reshape(d, p_t * p_f)), "bias": sd["patch_embed.proj.bias"]},
        "blocks": _blocks_from_torch(sd, depth, h, d // h, qkv_bias=True),
    }
    final = "embed_norm" if style == "post" else "norm"
    out[final] = {"scale": sd[f"{final}.weight"], "bias": sd[f"{final}.bias"]}
    return as_contiguous(out)


def vit_patch_size(sd) -> tuple[int, int]:
    """``(p_t, p_f)`` of an official ViT ``state_dict`` (the conv kernel's spatial shape)."""
    return tuple(int(x) for x in np.shape(sd["patch_embed.proj.weight"])[2:])


# ----------------------------------------------------------------------------------------------------------
# Projector / predictor heads: nn.Sequential(Linear, BatchNorm1d, ReLU, Linear) → indices 0, 1, 3
# ----------------------------------------------------------------------------------------------------------


def head_to_torch(params, stats) -> dict:
    """A BNMLP head (``fc1``/``bn``/``fc2`` params + ``bn`` buffers) → ``{"0.weight", "1.*", "3.weight"}``.

    ``num_batches_tracked`` becomes an int64 scalar, as PyTorch stores it.
    """
    bn, bn_stats = params["bn"], stats["bn"]
    return {
        "0.weight": _t(params["fc1"]["kernel"]),
        "1.weight": bn["scale"],
        "1.bias": bn["bias"],
        "1.running_mean": bn_stats["running_mean"],
        "1.running_var": bn_stats["running_var"],
        "1.num_batches_tracked": bn_stats["num_batches_tracked"].astype(np.int64).reshape(()),
        "3.weight": _t(params["fc2"]["kernel"]),
    }


def torch_to_head(sd) -> tuple[dict, dict]:
    """Inverse of :func:`head_to_torch` for the keys of one head (prefix removed): ``(params, stats)``.

    ``num_batches_tracked`` returns as int32, the dtype of the JAX BatchStat.
    """
    sd = {k: np.asarray(v) for k, v in sd.items()}
    params = {
        "fc1": {"kernel": _t(sd["0.weight"])},
        "bn": {"scale": sd["1.weight"], "bias": sd["1.bias"]},
        "fc2": {"kernel": _t(sd["3.weight"])},
    }
    stats = {
        "bn": {
            "running_mean": sd["1.running_mean"],
            "running_var": sd["1.running_var"],
            "num_batches_tracked": sd["1.num_batches_tracked"].astype(np.int32).reshape(()),
        }
    }
    return as_contiguous(params), as_contiguous(stats)


# ----------------------------------------------------------------------------------------------------------
# Whole networks (the ``model.student.*`` / ``model.teacher.*`` parts of a pretraining checkpoint)
# ----------------------------------------------------------------------------------------------------------

HEAD_NAMES = ("projector", "predictor")


def network_to_torch(params, stats) -> dict:
    """Student or teacher (``encoder`` + heads present in ``params``) → ``{"encoder.*", "projector.*", …}``."""
    out = {f"encoder.{k}": v for k, v in encoder_to_torch(params["encoder"]).items()}
    for head in HEAD_NAMES:
        if head in params:
            out.update({f"{head}.{k}": v for k, v in head_to_torch(params[head], stats[head]).items()})
    return out


def torch_to_network(sd, heads: int | None = None) -> tuple[dict, dict]:
    """Inverse of :func:`network_to_torch`: ``(params, stats)`` with ``encoder`` and whichever heads exist."""
    params = {"encoder": torch_to_encoder(sub_dict(sd, "encoder."), heads)}
    stats = {}
    for head in HEAD_NAMES:
        part = sub_dict(sd, f"{head}.")
        if part:
            params[head], stats[head] = torch_to_head(part)
    return params, stats


def sub_dict(sd, prefix: str) -> dict:
    """The entries of ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def as_contiguous(tree):
    """NumPy copies in C order (safetensors and ``torch.from_numpy`` need contiguous, owned buffers).

    ``np.array(order="C")`` rather than ``np.ascontiguousarray``, which turns 0-d arrays (the BatchNorm
    ``num_batches_tracked`` scalars) into shape ``[1]``.
    """
    if isinstance(tree, dict):
        return {k: as_contiguous(v) for k, v in tree.items()}
    return np.array(tree, order="C")


def count(sd) -> int:
    return sum(int(np.prod(v.shape)) for v in sd.values())


# ----------------------------------------------------------------------------------------------------------
# AaPE branch (models/aape.py): ``aape.*`` keys beside either encoder layout (torch module: torch_aape.py)
# ----------------------------------------------------------------------------------------------------------
#
# | key | shape | JAX |
# |---|---|---|
# | ``aape.lambda_fc1.weight`` / ``.bias`` | [hidden, stat_bins] / [hidden] | ``lambda_fc1`` (transposed) |
# | ``aape.lambda_fc2.weight`` / ``.bias`` | [2K, hidden] / [2K] | ``lambda_fc2`` [hidden, K, 2]: row ``2k + j``, j = 0 α, 1 ω |
# | ``aape.band_bias`` | [S, K, 2] | ``band_bias`` |
# | ``aape.gain_b`` / ``aape.gain_c`` | [S, K] | ``gain_b`` / ``gain_c`` (B and C of the SBLU) |
# | ``aape.norm.weight`` / ``.bias`` | [F] | ``norm`` (only with ``feature_norm``) |
# | ``aape.fuse.weight`` / ``.bias`` | [D, F] / [D] | ``fuse`` (transposed) |
#
# S subbands, K kernels per subband, F = the features of one token. The configuration (``AapeConfig``) is
# not in the weights: exports record it as JSON in the safetensors metadata entry ``aape``.


def aape_to_torch(p) -> dict:
    """JAX AaPE params → ``{"aape.<key>": array}`` (the table above)."""
    fc2 = p["lambda_fc2"]["kernel"]  # [hidden, K, 2]
    out = {
        "aape.lambda_fc1.weight": _t(p["lambda_fc1"]["kernel"]),
        "aape.lambda_fc1.bias": p["lambda_fc1"]["bias"],
        "aape.lambda_fc2.weight": _t(fc2.reshape(fc2.shape[0], -1)),
        "aape.lambda_fc2.bias": p["lambda_fc2"]["bias"].reshape(-1),
        "aape.band_bias": p["band_bias"],
        "aape.gain_b": p["gain_b"],
        "aape.gain_c": p["gain_c"],
        "aape.fuse.weight": _t(p["fuse"]["kernel"]),
        "aape.fuse.bias": p["fuse"]["bias"],
    }
    if p.get("norm") is not None:
        out["aape.norm.weight"] = p["norm"]["scale"]
        out["aape.norm.bias"] = p["norm"]["bias"]
    return out


def torch_to_aape(sd) -> dict:
    """Inverse of :func:`aape_to_torch` (``sd`` with or without the ``aape.`` prefix)."""
    sd = {k.removeprefix("aape."): np.asarray(v) for k, v in sd.items()}
    k = sd["band_bias"].shape[1]
    out = {
        "lambda_fc1": {"kernel": _t(sd["lambda_fc1.weight"]), "bias": sd["lambda_fc1.bias"]},
        "lambda_fc2": {
            "kernel": _t(sd["lambda_fc2.weight"]).reshape(-1, k, 2),
            "bias": sd["lambda_fc2.bias"].reshape(k, 2),
        },
        "band_bias": sd["band_bias"],
        "gain_b": sd["gain_b"],
        "gain_c": sd["gain_c"],
        "fuse": {"kernel": _t(sd["fuse.weight"]), "bias": sd["fuse.bias"]},
    }
    if "norm.weight" in sd:
        out["norm"] = {"scale": sd["norm.weight"], "bias": sd["norm.bias"]}
    return as_contiguous(out)


def split_aape(sd) -> tuple[dict, dict]:
    """``(encoder keys, aape keys)`` of a flat state_dict."""
    rest = {k: v for k, v in sd.items() if not k.startswith("aape.")}
    return rest, {k: v for k, v in sd.items() if k.startswith("aape.")}


def sincos_pos_embed(n_time: int, n_freq: int, width: int) -> np.ndarray:
    """A 2-D stem's fixed sin-cos positions as a ViT ``pos_embed [1, 1 + N, D]``: slot 0 (the CLS token,
    which has no position under sin-cos) zero, then the patch grid's positions (``stems.sincos_2d``)."""
    from atst_jax.models.stems import sincos_2d

    table = sincos_2d(n_time, n_freq, width)
    return np.concatenate([np.zeros((1, width), np.float32), table], axis=0)[None]
