"""X-ARES (https://github.com/jimbozhang/xares) encoders for exported ATST-Frame, ATST-Clip and 2-D patch ViT
encoders.

X-ARES takes a ``torch.nn.Module`` whose class name ends in ``Encoder``, built without arguments, with
``sampling_rate``, ``output_dim`` and ``hop_size_in_ms``, and ``forward(audio [B, samples]) -> [B, T', D]``.
``python -m atst_jax.export --format xares --out DIR`` writes ``DIR/encoder.safetensors`` and a file
``DIR/<kind>_encoder.py`` with such a class (a subclass of one below, reading the weights beside it), the
file to give ``python -m xares.run``. The classes here take the weights' path:

    from atst_jax.export.xares import ATSTFrameEncoder
    enc = ATSTFrameEncoder("encoder.safetensors")
    emb = enc(audio)                       # [B, samples] at enc.sampling_rate -> [B, T', enc.output_dim]

Everything below the interface is the HEAR embedder's (``atst_jax.export.hear``): the front end over the
whole clip, chunks of the encoder's trained crop on its own time grid, the padding of a short last chunk
masked out of attention, the last block through the final norm (``n_blocks=1``: ``output_dim`` = the width).
So the output is, step for step, what ``hear.get_timestamp_embeddings`` gives for the same audio:

* ATST-Frame / ATST-Clip: 16 kHz log-mel, one step per 40 ms token (``(samples // 160 + 1) // 4`` steps);
  the Clip CLS token is not a time step and is left out.
* 2-D patch ViTs (the official ASiT layout): the Kaldi fbank the file records — 32 kHz (``kaldi_fbank128``,
  ASiT's) or 16 kHz (``kaldi_fbank128_16k``, EAT's; ``sampling_rate`` 16000) — one step per 16-frame column
  of patches (160 ms), the mean of the column's frequency patches.

X-ARES hands over batches of equal-length crops without their lengths, so by default every sample counts as
audio. ``forward(audio, lengths)`` (samples per row) encodes each row from its own samples only: the front
end and the attention never see what follows a row's length, whatever it is, and the steps past it are 0.
Audio shorter than one step is zero-padded to one step (one output step).
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from atst_jax import inference
from atst_jax.export import hear
from atst_jax.export.load import EncoderFile, read_encoder_file

WEIGHTS = "encoder.safetensors"  # the weights' name inside a --format xares directory


def layout(f: EncoderFile) -> str:
    """``"vit"`` (the official ViT layout: 2-D patches), ``"clip"`` (FrameAST with a CLS token) or
    ``"frame"``: what the file's keys say, as ``atst_jax.export.load`` reads them."""
    if f.vit:
        return "vit"
    return "clip" if "cls_token" in f.sd else "frame"


class ExportedEncoder(nn.Module):
    """An X-ARES encoder from an exported encoder file of any layout (see the module docstring).

    ``n_blocks``: the last n blocks concatenated (``output_dim = n·D``); ``max_chunks``: chunks per encoder
    call (bounds memory on long audio); ``chunk_frames``: default what the file records (the trained crop).
    """

    LAYOUT: str | None = None  # the layout a subclass serves; None: any

    def __init__(
        self,
        path,
        *,
        n_blocks: int = 1,
        max_chunks: int = 8,
        chunk_frames: int | None = None,
        heads: int | None = None,
    ):
        super().__init__()
        f = read_encoder_file(path, "teacher", heads)
        if self.LAYOUT is not None and layout(f) != self.LAYOUT:
            raise ValueError(
                f"{path} holds a {layout(f)!r} layout encoder; {type(self).__name__} serves {self.LAYOUT!r} "
                f"(use {LAYOUT_CLASSES[layout(f)].__name__})"
            )
        self.embedder = hear.model_from_file(
            f, n_blocks=n_blocks, max_chunks=max_chunks, chunk_frames=chunk_frames
        )
        front = inference.front_end(f.features)  # the embedder has refused a front end it does not compute
        self._feature_set = front.feature_set
        # The stem's own geometry (frames per time step), asked of the inference config.
        self.time_patch = inference.time_patch(f.config())
        self.sampling_rate = int(self.embedder.sample_rate)
        self.output_dim = int(self.embedder.timestamp_embedding_size)
        self.hop_size_in_ms = front.hop_ms * self.time_patch
        self.min_samples = self._min_samples()

    def _min_samples(self) -> int:
        """The fewest samples that give one time step (the front end's frame count is monotone)."""
        return bisect.bisect_left(range(1, 1 << 24), 1, key=self.num_steps) + 1

    def num_steps(self, samples: int) -> int:
        """Output steps of ``samples`` samples (0 below one step)."""
        return self._feature_set.num_frames(max(int(samples), 1)) // self.time_patch

    def _embed(self, wave):
        """``[B, samples]`` -> ``[B, steps, D]``, all samples audio; too short a wave is zero-padded."""
        if wave.shape[-1] < self.min_samples:
            wave = nn.functional.pad(wave, (0, self.min_samples - wave.shape[-1]))
        return hear.get_timestamp_embeddings(wave, self.embedder)[0]

    @torch.no_grad()
    def forward(self, audio, lengths=None):
        """``audio [B, samples]`` (or ``[samples]``) at ``sampling_rate`` -> ``[B, T', output_dim]`` on the
        audio's device, ``T' = num_steps(samples)`` (at least 1). ``lengths [B]``: valid samples per row,
        each row then encoded from its own samples only (steps past its length are 0)."""
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {tuple(audio.shape)}")
        if lengths is None:
            return self._embed(audio).to(audio.device)
        lengths = [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]
        if len(lengths) != audio.shape[0] or not all(1 <= n <= audio.shape[1] for n in lengths):
            raise ValueError(
                f"lengths must give 1..{audio.shape[1]} valid samples for each of the {audio.shape[0]} rows"
            )
        steps = max(1, self.num_steps(audio.shape[1]))
        out = audio.new_zeros(audio.shape[0], steps, self.output_dim, dtype=torch.float32)
        for i, n in enumerate(lengths):
            emb = self._embed(audio[i : i + 1, :n])[0]
            out[i, : emb.shape[0]] = emb.to(out.device)
        return out


class ATSTFrameEncoder(ExportedEncoder):
    """ATST-Frame (FrameAST without CLS): 16 kHz, 40 ms steps, chunks of the trained crop (≤ 10 s)."""

    LAYOUT = "frame"


class ATSTClipEncoder(ExportedEncoder):
    """ATST-Clip (FrameAST with a CLS token, left out of the steps): 16 kHz, 40 ms steps, chunks of the
    pretraining crop (6 s for the official models)."""

    LAYOUT = "clip"


class ViTEncoder(ExportedEncoder):
    """A 2-D patch ViT in the official ASiT layout: the Kaldi fbank it was trained on (32 kHz, or 16 kHz for
    EAT's front end), 160 ms steps (16-frame columns), chunks of the positions' length (592 frames)."""

    LAYOUT = "vit"


LAYOUT_CLASSES = {"frame": ATSTFrameEncoder, "clip": ATSTClipEncoder, "vit": ViTEncoder}

# The file --format xares writes. X-ARES imports it by its path and takes the one name in it that ends in
# "Encoder", so the adapter module is imported under another name.
ENCODER_FILE = '''"""X-ARES encoder: {description}, weights in {weights} beside this file.

Written by ``python -m atst_jax.export --format xares``. X-ARES imports this file by its relative path (as a
module name), so run it from the directory that holds {dirname}/:

    python -m xares.run --max-jobs 8 {dirname}/{filename} <xares task files>
"""

from pathlib import Path

from atst_jax.export import xares as _adapter


class {cls}(_adapter.{cls}):
    def __init__(self):
        super().__init__(Path(__file__).resolve().with_name("{weights}"))
'''


def encoder_file_name(kind: str) -> str:
    """The name of the encoder file of a layout: ``atst_frame_encoder.py``, ``atst_clip_encoder.py``,
    ``vit_encoder.py``."""
    return {"frame": "atst_frame", "clip": "atst_clip", "vit": "vit"}[kind] + "_encoder.py"


def write_encoder_file(directory, dirname: str | None = None):
    """Writes the X-ARES encoder file beside ``directory/encoder.safetensors`` (whose layout picks the class)
    and checks that it builds; returns its path. ``dirname``: how the docstring names the directory."""
    from pathlib import Path

    directory = Path(directory)
    weights = directory / WEIGHTS
    kind = layout(read_encoder_file(weights))
    cls = LAYOUT_CLASSES[kind]
    cls(weights)  # refuses what the adapter cannot serve (e.g. a front end without a PyTorch twin)
    path = directory / encoder_file_name(kind)
    description = (cls.__doc__ or cls.__name__).split(":")[0]
    path.write_text(
        ENCODER_FILE.format(
            description=description,
            dirname=dirname or directory.name,
            filename=path.name,
            cls=cls.__name__,
            weights=WEIGHTS,
        )
    )
    return path
