"""Export a run's checkpoint to the files PyTorch users load (spec/torch_export.md).

    python -m atst_jax.export --workdir RUN [--step N] [--encoder teacher|student] \
        --format safetensors|atst_sed|lightning|hf|xares --out PATH

* ``safetensors``: exactly the 138 official encoder keys (139 for ATST-Clip: ``cls_token``, final norm
  ``norm.*``), float32, plus string metadata (format, width, depth, heads, step, encoder, chunk_frames —
  the inference chunk length, see ``atst_jax.inference``). ``safetensors.torch.load_file`` +
  ``load_state_dict(strict=True)``.
* ``atst_sed``: ``torch.save({"state_dict": {"model.teacher.encoder.<key>": tensor}})``, what ATST-SED
  reads. ``--encoder student`` puts the *student's* encoder under that same name, since that is the name
  the consumer looks for.
* ``lightning``: the official pretraining checkpoint layout (``model.student.{encoder,projector,predictor}``,
  ``model.teacher.{encoder,projector}`` with BatchNorm buffers, ``hyper_parameters``,
  ``pytorch-lightning_version``) for the official module's ``load_from_checkpoint`` and the downstream
  scripts (``FrameATSTLightningModule`` for ATST-Frame, ``ATSTLightningModule`` for ATST-Clip: both use
  this state_dict layout). The run's method writes ``hyper_parameters`` (``Method.lightning_hparams``); a
  method without an official Lightning module is refused. ``--encoder`` does not apply (both networks are
  written).

A 2-D patch encoder (``model.stem="patch2d"``, ASiT's ViT) has one layout, ``safetensors``: the official
``vision_transformer.py`` keys (``cls_token``, ``pos_embed``, ``patch_embed.proj.*`` as a Conv2d weight
``[D, 1, 16, 16]``, ``blocks.{i}.*`` with ``attn.qkv.bias``, ``norm.*``; 12·depth + 6 tensors), loadable
``strict=True`` into that ``VisionTransformer(in_chans=1, audio_size=[592, 128])`` and into
``atst_jax.export.torch_vit.VisionTransformer``; metadata ``format=asit_encoder``, ``features``
(``kaldi_fbank128``), ``chunk_frames`` (592), ``patch_size``, ``n_mels``. The FrameAST formats are refused.
A post-norm 2-D encoder (``model.norm_style="post"``, EAT's trunk) writes ``embed_norm.*`` in place of
``norm.*`` (``format=asit_encoder+postnorm``, metadata ``norm_style=post``; ``torch_vit.VisionTransformer``
loads it, the official pre-norm ViT does not); a post-norm frame-stem encoder is refused (the ATST layouts
are pre-norm).

``hf`` writes a Hugging Face model *directory* at ``--out`` (``atst_jax.export.hf``): a 2-D patch encoder as
transformers' ``ViTModel`` with an ``ASTFeatureExtractor`` configuration, a frame-stem encoder as a
``trust_remote_code`` model; both with a model card (``README.md``).

``xares`` writes an X-ARES encoder *directory* at ``--out`` (``atst_jax.export.xares``): the ``safetensors``
export as ``encoder.safetensors`` and ``<kind>_encoder.py`` (``atst_frame``, ``atst_clip`` or ``vit``), a
file defining the one no-argument ``...Encoder`` class that ``python -m xares.run`` imports by its path; the
file imports ``atst_jax``. An encoder the adapter cannot serve (a front end without a PyTorch twin) is refused.

Every file holds only tensors and plain Python values, so ``torch.load(..., weights_only=True)`` opens it.
Errors (missing run or step, unknown format) are reported on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from atst_jax import inference
from atst_jax.errors import UserError
from atst_jax.export import convert
from atst_jax.models.stems import export_layout

FORMATS = ("safetensors", "atst_sed", "lightning", "hf", "xares")
DIR_FORMATS = ("hf", "xares")  # --out is a directory
# 2-D patch encoders (model.stem="patch2d") have one layout: the official ViT's (ASiT's vision_transformer.py).
VIT_FORMATS = ("safetensors",)
VIT_FORMAT = "asit_encoder"  # the safetensors "format" metadata of that layout
# The official code targets Lightning 1.x; load_from_checkpoint only needs the entry to exist (it decides
# which checkpoint migrations to apply, none of which touch the keys written here).
LIGHTNING_VERSION = "1.9.5"


class ExportError(UserError):
    """A user error: printed as one line."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ExportError("this format needs torch: pip install -e .[torch]") from e
    return torch


def _tensors(sd):
    torch = _torch()
    return {k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}


def _lightning_hparams(config: dict, width: int, depth: int, heads: int) -> tuple[dict, list[str]]:
    """The run's method writes the official module's ``hyper_parameters`` (``Method.lightning_hparams``):
    the export knows no method by name, and a method without an official Lightning module says so."""
    from atst_jax.methods import get_class
    from atst_jax.sharding import ConfigError

    name = config.get("method")
    if not name:
        raise ExportError("the run's saved config names no method, which the lightning format needs")
    try:
        method = get_class(name)
    except ConfigError as e:
        raise ExportError(str(e)) from e
    result = method.lightning_hparams(config, width=width, depth=depth, heads=heads)
    if result is None:
        raise ExportError(f"method {name!r} has no official Lightning checkpoint layout: export safetensors")
    return result


def _export_vit(config: dict, state, step: int, fmt: str, out: Path, encoder: str, inputs=None) -> list[str]:
    """A 2-D patch encoder (``model.stem="patch2d"``) as a safetensors file in the official ViT layout
    (``convert.vit_to_torch``: ``patch_embed.proj`` Conv2d, ``cls_token``, ``pos_embed``, qkv bias, ``norm``).
    ``inputs``: the crops the checkpoint records (``checkpoint.recorded_inputs``), None for older ones."""
    from safetensors.numpy import save_file

    from atst_jax.models.encoder import EncoderConfig

    if fmt not in VIT_FORMATS:
        raise ExportError(
            f"format {fmt!r} is a layout of ATST's FrameAST; a 2-D patch encoder (model.stem='patch2d') "
            f"exports as {' or '.join(VIT_FORMATS)} (the official ViT layout)"
        )
    cfg = EncoderConfig.from_config(config["model"])
    enc = state["teacher" if encoder == "teacher" else "params"]["encoder"]
    chunk = inference.encoder_chunk_frames(cfg, config, inputs)
    if cfg.pos_embed == "sincos2d" and cfg.use_cls:  # fixed positions, written out as the ViT's pos_embed
        n_f = cfg.n_mels // cfg.patch_size[1]
        enc = dict(enc, pos_embed=convert.sincos_pos_embed(chunk // cfg.patch_size[0], n_f, cfg.width))
    try:
        sd = convert.as_contiguous(convert.vit_to_torch(enc, cfg.patch_size))
    except ValueError as e:
        raise ExportError(
            f"model.stem='patch2d' with pos_embed={cfg.pos_embed!r}, use_cls={cfg.use_cls}: {e}"
        ) from e
    qkv = enc["blocks"]["attn"]["qkv"]["kernel"]  # [L, D, 3, H, hd]
    post = convert.norm_style(enc) == "post"
    meta = {
        # The post-norm layout's keys differ (embed_norm.*, no norm.*): the official ViT's loaders refuse it.
        "format": f"{VIT_FORMAT}+postnorm" if post else VIT_FORMAT,
        "width": str(qkv.shape[1]),
        "depth": str(qkv.shape[0]),
        "heads": str(qkv.shape[3]),
        "step": str(step),
        "encoder": encoder,
        "patch_size": ",".join(str(p) for p in cfg.patch_size),
        "n_mels": str(cfg.n_mels),
        # What inference needs and the weights do not tell: the front end (the method's feature set) and
        # the chunk length (the positions' length, at most the longest pretraining crop).
        "features": inference.run_features(config, cfg, inputs),
        "chunk_frames": str(chunk),
    }
    if post:
        meta["norm_style"] = "post"
    _add_aape(sd, meta, enc, cfg, meta["format"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in sd.items()}, str(out), metadata=meta)
    return []


def _add_aape(sd: dict, meta: dict, enc, cfg, base_format: str) -> None:
    """An encoder with the AaPE branch: its ``aape.*`` keys (``convert.aape_to_torch``), its configuration as
    JSON under the metadata key ``aape``, and ``format`` = ``<base>+aape`` (the base layout's loaders would
    refuse the extra keys; ``torch_aape`` loads both)."""
    if enc.get("aape") is None:
        return
    import dataclasses
    import json

    sd.update(convert.as_contiguous(convert.aape_to_torch(enc["aape"])))
    meta["aape"] = json.dumps(dataclasses.asdict(cfg.aape))
    meta["format"] = f"{base_format}+aape"


def export(workdir, fmt: str, out, *, step: int | None = None, encoder: str = "teacher") -> list[str]:
    """Writes ``out`` in ``fmt`` from a run's checkpoint; returns the warnings (for the caller to print).

    The file is written beside ``out`` under a hidden temporary name and renamed into place when complete,
    so a crash or an error never leaves a truncated export, nor destroys an earlier file at ``out``."""
    if fmt == "hf":  # directories, swapped into place whole (_write_directory)
        return _write_hf(workdir, out, step=step, encoder=encoder)
    if fmt == "xares":
        return _write_xares(workdir, out, step=step, encoder=encoder)
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        warnings = _write(workdir, fmt, partial, step=step, encoder=encoder)
        partial.chmod(0o644)  # the writers create files owner-only; an export is meant to be shared
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return warnings


def _read_run(workdir, step: int | None, encoder: str):
    """``(step, config, state)`` of the run's checkpoint to export, with one-line errors for a bad encoder
    name, a missing run directory or a missing step."""
    from atst_jax.checkpoint import read_checkpoint

    if encoder not in ("teacher", "student"):
        raise ExportError(f"unknown encoder {encoder!r}: choose teacher or student")
    if not Path(workdir).is_dir():
        raise ExportError(f"no such run directory: {workdir}")
    try:
        return read_checkpoint(workdir, step)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e


def _write_directory(out, fmt: str, fill) -> list[str]:
    """A directory export (``hf``, ``xares``): ``fill(partial)`` writes it into a hidden sibling that does not
    exist yet, which then replaces ``out`` whole, so a failure leaves any earlier directory at ``out``
    untouched and no partial one. Returns ``fill``'s warnings."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory (--format {fmt} writes a directory)")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        warnings = fill(partial)
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return warnings


def _write_hf(workdir, out, *, step: int | None, encoder: str) -> list[str]:
    from atst_jax.export import hf

    step, config, state = _read_run(workdir, step, encoder)

    def fill(partial: Path) -> list[str]:
        hf.write_dir(workdir, config, state, step, encoder, partial)
        return []

    return _write_directory(out, "hf", fill)


def _write_xares(workdir, out, *, step: int | None, encoder: str) -> list[str]:
    """The safetensors export and its X-ARES encoder file (a directory, as ``hf``)."""
    from atst_jax.export import xares

    def fill(partial: Path) -> list[str]:
        partial.mkdir(parents=True)
        warnings = _write(workdir, "safetensors", partial / xares.WEIGHTS, step=step, encoder=encoder)
        try:
            xares.write_encoder_file(partial, dirname=Path(out).name)
        except ValueError as e:
            raise ExportError(f"--format xares: {e}") from e
        for f in partial.iterdir():
            f.chmod(0o644)  # as the single-file formats: an export is meant to be shared
        return warnings

    return _write_directory(out, "xares", fill)


def _write(workdir, fmt: str, out: Path, *, step: int | None, encoder: str) -> list[str]:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    from atst_jax.checkpoint import recorded_inputs

    step, config, state = _read_run(workdir, step, encoder)
    inputs = recorded_inputs(workdir, step)  # the trained crops (None: a checkpoint older than the entry)
    try:
        layout = export_layout((config or {}).get("model"))
    except ValueError as e:
        raise ExportError(str(e)) from e
    if layout == "vit":
        return _export_vit(config, state, step, fmt, out, encoder, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    enc = state["teacher" if encoder == "teacher" else "params"]["encoder"]
    if convert.norm_style(enc) == "post":
        raise ExportError(
            "model.norm_style='post': the ATST FrameAST layouts are pre-norm; only 2-D patch encoders "
            "(model.stem='patch2d') export post-norm"
        )
    if convert.has_qkv_bias(enc):
        raise ExportError("this frame-stem encoder has a qkv bias, which the ATST FrameAST layouts lack")
    qkv = enc["blocks"]["attn"]["qkv"]["kernel"]  # [L, D, 3, H, hd]
    depth, width, heads = qkv.shape[0], qkv.shape[1], qkv.shape[3]
    warnings = []
    if enc.get("aape") is not None and fmt != "safetensors":
        raise ExportError(
            f"format {fmt!r}: the official loaders take FrameAST's keys only (strict), and this encoder has an "
            "AaPE branch (model.aape): export safetensors (atst_jax.export.torch_aape loads it)"
        )

    if fmt == "safetensors":
        from safetensors.numpy import save_file

        sd = convert.as_contiguous(convert.encoder_to_torch(enc))
        num_pos = np.shape(enc["pos_embed"])[1]
        meta = {
            "format": "atst_clip_encoder" if convert.is_clip(enc) else "atst_frame_encoder",
            "width": str(width),
            "depth": str(depth),
            "heads": str(heads),
            "step": str(step),
            "encoder": encoder,
            # The chunk length inference should use (atst_jax.inference): the pretraining crop, which the
            # weights alone do not tell.
            "chunk_frames": str(
                inference.run_chunk_frames(config, convert.is_clip(enc), num_pos=num_pos, inputs=inputs)
            ),
        }
        if enc.get("aape") is not None:
            from atst_jax.models.encoder import EncoderConfig

            _add_aape(sd, meta, enc, EncoderConfig.from_config(config["model"]), meta["format"])
        save_file({k: v.astype(np.float32) for k, v in sd.items()}, str(out), metadata=meta)
    elif fmt == "atst_sed":
        torch = _torch()
        sd = convert.encoder_to_torch(enc)
        torch.save({"state_dict": _tensors({f"model.teacher.encoder.{k}": v for k, v in sd.items()})}, out)
    else:
        # The method decides first whether it has an official Lightning layout at all: the networks of one
        # that has none (compose's attention predictor, no BatchNorm heads) do not convert to it.
        if not config:
            raise ExportError(
                f"step {step} of {workdir} has no saved config, which the lightning format needs"
            )
        hp, warnings = _lightning_hparams(config, width, depth, heads)
        torch = _torch()
        if "predictor" not in state["params"]:
            raise ExportError("the lightning format needs an ATST student with a predictor")
        sd = {
            f"model.student.{k}": v
            for k, v in convert.network_to_torch(state["params"], state["stats"]).items()
        }
        teacher = convert.network_to_torch(state["teacher"], state["teacher_stats"])
        sd.update({f"model.teacher.{k}": v for k, v in teacher.items()})
        ckpt = {
            "epoch": 0,
            "global_step": int(step),
            "pytorch-lightning_version": LIGHTNING_VERSION,
            "state_dict": _tensors(sd),
            "hyper_parameters": hp,
        }
        torch.save(ckpt, out)
    return warnings


def _parser() -> argparse.ArgumentParser:
    from atst_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m atst_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training run directory (with checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--encoder", default="teacher", help="teacher (default) or student")
    p.add_argument("--format", required=True, help="safetensors, atst_sed, lightning, hf or xares")
    p.add_argument("--out", required=True, help="output file (a directory for hf and xares)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Orbax logs several absl warnings on every read-only open (read_only options, items not restored):
    # noise for a command-line user.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from atst_jax.checkpoint import CheckpointRestoreError

    replaced = (os.path.isdir if args.format in DIR_FORMATS else os.path.isfile)(args.out)
    try:
        warnings = export(args.workdir, args.format, args.out, step=args.step, encoder=args.encoder)
    except (UserError, CheckpointRestoreError) as e:  # a damaged step: one line too
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ImportError as e:  # safetensors / torch live in the optional extra
        print(f"error: --format {args.format} needs {e.name or e}: pip install -e .[torch]", file=sys.stderr)
        return 2
    except OSError as e:  # --out in a missing or read-only place
        print(f"error: cannot write --out {args.out} ({e.strerror or e})", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    what = args.encoder if args.format != "lightning" else "student+teacher"
    print(f"{'replaced' if replaced else 'wrote'} {args.out} ({args.format}, {what})")
    if args.format == "xares":
        for path in sorted(Path(args.out).glob("*_encoder.py")):
            print(f"X-ARES encoder file: {path} (python -m xares.run takes it as a relative path)")
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
