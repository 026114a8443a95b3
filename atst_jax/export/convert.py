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
    qkv = blocks["attn"]["qkv"]["kernel"]  # [L, D, 3, H, hd]
    depth, d = qkv.shape[0], qkv.shape[1]
    proj = blocks["attn"]["proj"]["kernel"]  # [L, H, hd, D]
    clip = is_clip(p)

    out = {}
    if clip:
        out["cls_token"] = p["cls_token"]
    out["mask_embed"] = p["mask_embed"]
    out["pos_embed"] = p["pos_embed"]
    out["patch_embed.patch_embed.weight"] = _t(p["patch_embed"]["kernel"])
    out["patch_embed.patch_embed.bias"] = p["patch_embed"]["bias"]
    vectors = dict(_BLOCK_VECTORS)
    linears = dict(_BLOCK_LINEARS)
    for i in range(depth):
        for name in _BLOCK_ORDER:
            if name == "attn.qkv.weight":
                value = _t(qkv[i].reshape(d, -1))
            elif name == "attn.proj.weight":
                value = _t(proj[i].reshape(-1, d))
            elif name in linears:
                value = _t(_get(blocks, linears[name])[i])
            else:
                value = _get(blocks, vectors[name])[i]
            out[f"blocks.{i}.{name}"] = value
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
    """
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

    def stack(fn):
        return np.stack([fn(i) for i in range(depth)])

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
    _set(
        blocks,
        ("attn", "proj", "kernel"),
        stack(lambda i: _t(sd[f"blocks.{i}.attn.proj.weight"]).reshape(h, hd, d)),
    )
    out["blocks"] = blocks
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
