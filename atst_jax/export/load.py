"""Import PyTorch-side weights into JAX parameter trees (the inverse of ``python -m atst_jax.export``).

Accepted files, detected by content (not by name):

* a safetensors file of the bare 138 (139 for ATST-Clip) encoder keys, or of the official ViT keys
  (``patch_embed.proj``, a 2-D patch export; ``embed_norm.*`` instead of ``norm.*`` for a post-norm
  encoder, ``model.norm_style="post"``) — read with ``safetensors.numpy``, no torch needed;
* an official ASiT checkpoint (``{"student": …, "teacher": …, "args": Namespace, …}``; encoders under
  ``teacher.backbone.`` / ``student.module.backbone.``);
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

import argparse
import dataclasses
import json
import re
import struct
from pathlib import Path

import numpy as np

from atst_jax import inference
from atst_jax.export import convert

ENCODERS = ("teacher", "student")


def _is_safetensors(path: Path) -> bool:
    """safetensors files open with a little-endian u64 header size followed by a JSON object. A file cut short
    still counts (it is then a damaged safetensors file, not a torch file)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < size < 1 << 32  # a plausible header size, not stray bytes


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), {"metadata": metadata}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path}: damaged or truncated safetensors file ({str(e).splitlines()[0]})"
        ) from None


def _to_numpy(value):
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # NumPy has no bfloat16; weights are used in float32 here anyway
        return t.numpy()
    return value


def torch_load(path, allow: tuple = ()):
    """``torch.load`` restricted to tensors and plain values (``weights_only=True``), on the CPU; ``allow``:
    classes additionally accepted (``torch.serialization.safe_globals``)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading torch files needs torch (pip install -e .[torch])") from e
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only refuses files that would need arbitrary classes (and damaged files fail to unpickle).
        # torch's message is a screenful; keep its one informative sentence. No advice to allow-list classes:
        # that would run the file's code, and a damaged file is not fixed by it.
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|\n|$)", str(e))
        reason = found.group(1).strip() if found else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{path}: not a weights file this tool reads (torch.load with weights_only=True: {reason}); "
            "export it as safetensors, or save a plain state_dict of tensors"
        ) from e


def _is_official_vit_checkpoint(obj) -> bool:
    """``{"student": state_dict, "teacher": state_dict, "args": Namespace, …}`` with a ViT backbone, the
    Namespace (if any) only under ``args``."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), dict) for k in ENCODERS):
        return False
    others = [v for k, v in obj.items() if k != "args"]
    return any(k.endswith("backbone.patch_embed.proj.weight") for k in obj["teacher"]) and not any(
        isinstance(v, argparse.Namespace) for v in others
    )


def read_file(path) -> tuple[dict, dict]:
    """``(flat state_dict of NumPy arrays, extras)``; extras holds safetensors metadata (``metadata``) or a
    torch file's other top-level entries (``hyper_parameters``, …)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (an interrupted copy or export?)")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        obj = torch_load(path)
    except ValueError as refused:
        # Official ASiT (DINO-style) checkpoints keep the run's argparse ``args`` beside the state_dicts. A
        # Namespace only holds attributes, so it is accepted there — and only in that layout.
        obj = torch_load(path, allow=(argparse.Namespace,)) if "argparse.Namespace" in str(refused) else None
        if not _is_official_vit_checkpoint(obj):
            raise refused from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    nets = [k for k in ENCODERS if isinstance(obj.get(k), dict)]
    if isinstance(obj.get("state_dict"), dict):
        sd, extras = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif nets:  # official ASiT (DINO-style): {"student": sd, "teacher": sd, "args": Namespace, ...}
        sd = {f"{net}.{k}": v for net in nets for k, v in obj[net].items()}
        extras = {
            k: (vars(v) if isinstance(v, argparse.Namespace) else v) for k, v in obj.items() if k not in nets
        }
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
    candidates = [
        f"model.{encoder}.encoder.",
        f"{encoder}.encoder.",
        f"{encoder}.backbone.",  # official ASiT .pth: teacher.backbone.*, student.module.backbone.*
        f"{encoder}.module.backbone.",
        "encoder.",
        "model.encoder.",
        "",
    ]
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


def _chunk_frames(extras, use_cls: bool, num_pos: int | None = None) -> int:
    """The inference chunk length of a file's encoder (``atst_jax.inference``): our safetensors exports
    record it (``chunk_frames``); official ATST-Clip checkpoints record their pretraining crop
    (``hyper_parameters["train_len"]``, seconds), which the official downstream code chunks at; otherwise
    the kind's default."""
    meta = extras.get("metadata", {})
    if "chunk_frames" in meta:
        return int(meta["chunk_frames"])
    train_len = (extras.get("hyper_parameters") or {}).get("train_len")
    trained = inference.seconds_to_frames(float(train_len)) if train_len else None
    return inference.default_chunk_frames(use_cls, trained, num_pos=num_pos)


def read_encoder(path, encoder: str = "teacher", heads: int | None = None) -> tuple[dict, int | None, int]:
    """``(bare-key encoder state_dict of NumPy arrays, heads, chunk_frames)`` from any supported file.

    ``encoder`` picks the teacher's or the student's encoder where a file holds both; files with a single
    encoder return that one. ``heads``: as given, else the file's metadata (our safetensors exports record
    it), else None (the consumer then takes ``width // 64``, as in every official model).
    """
    f = read_encoder_file(path, encoder, heads)
    return f.sd, f.heads, f.chunk_frames


@dataclasses.dataclass
class EncoderFile:
    """An encoder read from a file (:func:`read_encoder_file`): bare-key ``sd`` (NumPy arrays) in the ATST
    FrameAST layout or the official ViT layout (``vit``), and what inference needs beside the weights."""

    sd: dict
    heads: int | None
    chunk_frames: int
    features: str  # an atst_jax.features name: the front end the encoder takes
    vit: bool
    metadata: dict

    @property
    def aape(self) -> dict | None:
        """The AaPE configuration of an encoder with ``aape.*`` keys (recorded as JSON in our exports)."""
        if not any(k.startswith("aape.") for k in self.sd):
            return None
        if "aape" not in self.metadata:
            raise ValueError("the file has aape.* weights but no 'aape' metadata (its configuration)")
        return json.loads(self.metadata["aape"])

    def params(self) -> dict:
        """JAX encoder params (nested dict, blocks stacked)."""
        sd, aape = convert.split_aape(self.sd)
        params = convert.torch_to_encoder(sd, self.heads)
        if aape:
            params["aape"] = convert.torch_to_aape(aape)
        return params

    def config(self, params=None):
        """The inference ``EncoderConfig`` (a 2-D patch encoder for the ViT layout; post-norm, EAT's trunk,
        where the file has ``embed_norm.*`` keys)."""
        params = self.params() if params is None else params
        extra = {"aape": self.aape} if self.aape is not None else {}
        if convert.norm_style(params) == "post":
            extra["norm_style"] = "post"
        if not self.vit:
            return inference.config_from_params(params, self.heads, **extra)
        return inference.config_from_params(
            params,
            self.heads,
            stem="patch2d",
            patch_size=convert.vit_patch_size(self.sd),
            n_mels=int(self.metadata.get("n_mels", VIT_N_MELS)),
            **extra,
        )

    def jax_encoder(self):
        """A ready JAX ``FrameAST`` holding these weights (float32, inference config)."""
        params = self.params()
        return inference.encoder_from_params(params, self.config(params))


VIT_N_MELS = 128  # the official ViT layout's mel bins when a file does not record them (ASiT: 128)


def _vit_chunk_frames(sd, extras) -> int:
    """A ViT file's chunk length: our exports record it; official ASiT checkpoints their ``args.num_frames``;
    otherwise the positions' length (``(num_pos − 1) / n_freq_patches · p_t``)."""
    meta = extras.get("metadata", {})
    if "chunk_frames" in meta:
        return int(meta["chunk_frames"])
    p_t, p_f = convert.vit_patch_size(sd)
    n_f = int(meta.get("n_mels", VIT_N_MELS)) // p_f
    frames = (np.shape(sd["pos_embed"])[1] - 1) // n_f * p_t
    args = extras.get("args")
    trained = args.get("num_frames") if isinstance(args, dict) else None
    return min(frames, int(trained) // p_t * p_t) if trained else frames


def read_encoder_file(path, encoder: str = "teacher", heads: int | None = None) -> EncoderFile:
    """:func:`read_encoder` with the layout and the front end: our safetensors exports record the feature set
    (``features``); otherwise the ViT layout takes ``kaldi_fbank128`` (ASiT's) and the ATST layouts
    ``atst_logmel64``. Also reads official ASiT checkpoints (``{"teacher": …, "student": …}`` with
    ``backbone.`` / ``module.backbone.`` prefixes)."""
    sd, extras = read_file(path)
    sd = convert.sub_dict(sd, encoder_prefix(sd, encoder))
    meta = extras.get("metadata", {})
    vit = convert.is_vit_state_dict(sd)
    if vit:
        # A backbone's own extras (classifier head, the ASiT FullPipeline's identities) are not the encoder.
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc."))}
        chunk = _vit_chunk_frames(sd, extras)
        default = "kaldi_fbank128"
    else:
        chunk = _chunk_frames(extras, "cls_token" in sd, np.shape(sd["pos_embed"])[1])
        default = "atst_logmel64"
    return EncoderFile(sd, _heads(extras, heads), chunk, meta.get("features", default), vit, dict(meta))


def load_encoder_params(path, encoder: str = "teacher", heads: int | None = None) -> dict:
    """JAX encoder params (nested dict, blocks stacked) from any supported file (see :func:`read_encoder`),
    AaPE exports included (their ``aape`` parameters beside the trunk's)."""
    return read_encoder_file(path, encoder, heads).params()


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
