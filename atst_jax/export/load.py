"""Import PyTorch-side weights into JAX parameter trees (the inverse of ``python -m atst_jax.export``).

Accepted files, detected by content (not by name):

* a safetensors file of the bare 138 (139 for ATST-Clip) encoder keys — read with ``safetensors.numpy``,
  no torch needed;
* a ``torch.save`` file: an ATST-SED style ``{"state_dict": {"model.teacher.encoder.<key>": …}}``, a
  Lightning pretraining checkpoint (ours or the official released ones: ``model.student.*`` /
  ``model.teacher.*``), or a plain state_dict (bare, ``encoder.*``, ``teacher.encoder.*`` keys).

Torch files are only ever opened with ``torch.load(..., weights_only=True)``, which refuses anything but
tensors and plain containers/values: loading weights never runs pickled code. A file that needs more than
that (e.g. a checkpoint with arbitrary Python objects in its hyper-parameters) fails with a clear error
instead of being unpickled.

The results are nested dicts of NumPy arrays in the layout of this repository's checkpoints; use
``atst_jax.inference.encoder_from_params`` for a ready ``FrameAST``, or ``nnx.replace_by_pure_dict`` on a
model's state to start fine-tuning from official weights.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from atst_jax import inference
from atst_jax.export import convert

ENCODERS = ("teacher", "student")


def _is_safetensors(path: Path) -> bool:
    """safetensors files open with a little-endian u64 header size followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < size <= path.stat().st_size - 8


def _to_numpy(value):
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # NumPy has no bfloat16; weights are used in float32 here anyway
        return t.numpy()
    return value


def torch_load(path):
    """``torch.load`` restricted to tensors and plain values (``weights_only=True``), on the CPU."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading torch files needs torch (pip install -e .[torch])") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only refuses files that would need arbitrary classes. torch's message is a screenful;
        # keep its one informative sentence (which global was refused) and say how to proceed.
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|\n|$)", str(e))
        reason = found.group(1).strip() if found else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{path}: not loadable with weights_only=True ({reason}); if you trust the file, allow-list the "
            "class with `with torch.serialization.safe_globals([...]):` around this call"
        ) from e


def read_file(path) -> tuple[dict, dict]:
    """``(flat state_dict of NumPy arrays, extras)``; extras holds safetensors metadata (``metadata``) or a
    torch file's other top-level entries (``hyper_parameters``, …)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if _is_safetensors(path):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), {"metadata": metadata}
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    if isinstance(obj.get("state_dict"), dict):
        sd, extras = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    else:
        sd, extras = obj, {}
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    return sd, extras


def encoder_prefix(sd, encoder: str = "teacher") -> str:
    """The key prefix of the requested encoder in a flat state_dict (``""`` for bare keys)."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be teacher or student, got {encoder!r}")
    candidates = [f"model.{encoder}.encoder.", f"{encoder}.encoder.", "encoder.", "model.encoder.", ""]
    for prefix in candidates:
        if f"{prefix}pos_embed" in sd:
            return prefix
    found = sorted({k[: -len("pos_embed")] for k in sd if k.endswith("pos_embed")})
    raise KeyError(f"no {encoder} encoder in this file (encoders found under: {found or 'none'})")


def _heads(extras, heads):
    if heads is not None:
        return heads
    meta = extras.get("metadata", {})
    return int(meta["heads"]) if "heads" in meta else None


def _chunk_frames(extras, use_cls: bool) -> int:
    """The inference chunk length of a file's encoder (``atst_jax.inference``): our safetensors exports
    record it (``chunk_frames``); official ATST-Clip checkpoints record their pretraining crop
    (``hyper_parameters["train_len"]``, seconds), which the official downstream code chunks at; otherwise
    the kind's default."""
    meta = extras.get("metadata", {})
    if "chunk_frames" in meta:
        return int(meta["chunk_frames"])
    train_len = (extras.get("hyper_parameters") or {}).get("train_len")
    trained = inference.seconds_to_frames(float(train_len)) if train_len else None
    return inference.default_chunk_frames(use_cls, trained)


def read_encoder(path, encoder: str = "teacher", heads: int | None = None) -> tuple[dict, int | None, int]:
    """``(bare-key encoder state_dict of NumPy arrays, heads, chunk_frames)`` from any supported file.

    ``encoder`` picks the teacher's or the student's encoder where a file holds both; files with a single
    encoder return that one. ``heads``: as given, else the file's metadata (our safetensors exports record
    it), else None (the consumer then takes ``width // 64``, as in every official model).
    """
    sd, extras = read_file(path)
    sd = convert.sub_dict(sd, encoder_prefix(sd, encoder))
    return sd, _heads(extras, heads), _chunk_frames(extras, "cls_token" in sd)


def load_encoder_params(path, encoder: str = "teacher", heads: int | None = None) -> dict:
    """JAX encoder params (nested dict, blocks stacked) from any supported file (see :func:`read_encoder`)."""
    sd, heads, _ = read_encoder(path, encoder, heads)
    return convert.torch_to_encoder(sd, heads)


def load_pretraining(path, heads: int | None = None) -> dict:
    """A Lightning-layout pretraining checkpoint → the parts of this repository's train state.

    Returns ``{"params": student {encoder, projector, predictor}, "stats": student BN buffers,
    "teacher": {encoder, projector}, "teacher_stats": …, "hyper_parameters": dict}``.
    """
    sd, extras = read_file(path)
    out = {"hyper_parameters": dict(extras.get("hyper_parameters") or {})}
    for net, (pkey, skey) in {
        "student": ("params", "stats"),
        "teacher": ("teacher", "teacher_stats"),
    }.items():
        part = convert.sub_dict(sd, f"model.{net}.")
        if not part:
            raise KeyError(f"{path}: no model.{net}.* entries: not a pretraining checkpoint")
        out[pkey], out[skey] = convert.torch_to_network(part, _heads(extras, heads))
    return out
