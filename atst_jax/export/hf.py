"""Export a run's encoder as a Hugging Face ``transformers`` model directory (``--format hf``).

* 2-D patch encoders (``model.stem="patch2d"``, ASiT's pre-norm ViT) become transformers' own ``ViTModel``:
  one input channel, ``image_size = (chunk frames, n_mels)`` so that the patch conv over ``[B, 1, T, n_mels]``
  flattens time-major exactly as our tokens are ordered, q/k/v split out of the fused qkv, LayerNorm eps 1e-6,
  exact GELU. ``preprocessor_config.json`` configures an ``ASTFeatureExtractor`` for the run's Kaldi fbank.
* Frame-stem encoders (ATST-Frame, ATST-Clip), which transformers has no class for, become a
  ``trust_remote_code`` model: ``configuration_atst.py`` and ``modeling_atst.py`` are written into the
  directory (the templates below: plain torch + transformers, nothing from this package), ``config.json``
  names them in ``auto_map``, and the weights keep the official FrameAST keys.

Weights are ``model.safetensors`` in float32; ``README.md`` is a model card (method, size, steps, clips seen,
the data fingerprint and the training compute — device-hours, FLOPs, mean MFU — when the checkpoint records
them, the run's probe results when there are any).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atst_jax import features as feature_sets
from atst_jax import inference
from atst_jax.errors import UserError
from atst_jax.export import convert
from atst_jax.models.stems import export_layout

LN_EPS = 1e-6


class HFExportError(UserError):
    """A user error: printed as one line."""


# ----------------------------------------------------------------------------------------------------------
# 2-D patch ViT → transformers.ViTModel
# ----------------------------------------------------------------------------------------------------------


def vit_to_hf(sd: dict, depth: int) -> dict:
    """Official ViT keys (``convert.vit_to_torch``) → ``ViTModel`` keys, under the names transformers 4.x
    wrote (5.x renames them on load), so the directory loads in both generations.

    The fused ``attn.qkv`` rows are ``[q; k; v]``, each head-major, which is how ``ViTModel`` reshapes its
    separate query/key/value outputs: a plain three-way row split. The pooler is written as the identity with
    ``pooler_act="linear"`` (see :func:`vit_config`)."""
    width = sd["cls_token"].shape[-1]
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
    }
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv_w, qkv_b = np.asarray(sd[b + "attn.qkv.weight"]), np.asarray(sd[b + "attn.qkv.bias"])
        for j, name in enumerate(("query", "key", "value")):
            out[f"{h}attention.attention.{name}.weight"] = qkv_w[j * width : (j + 1) * width]
            out[f"{h}attention.attention.{name}.bias"] = qkv_b[j * width : (j + 1) * width]
        pairs = {
            "attention.output.dense": "attn.proj",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
        }
        for hf_name, ours in pairs.items():
            out[f"{h}{hf_name}.weight"] = sd[f"{b}{ours}.weight"]
            out[f"{h}{hf_name}.bias"] = sd[f"{b}{ours}.bias"]
    out["layernorm.weight"], out["layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    out["pooler.dense.weight"] = np.eye(width, dtype=np.float32)
    out["pooler.dense.bias"] = np.zeros(width, np.float32)
    return out


def vit_config(cfg, chunk: int, mlp_hidden: int) -> dict:
    """``config.json`` of the ``ViTModel``. ``image_size = (frames, mel bins)``: ``pixel_values`` are
    ``[B, 1, frames, n_mels]``, the feature extractor's output with a channel axis added.

    ``ViTModel`` always builds a pooler (dense + activation on the CLS row) that ASiT's ViT lacks; left out of
    the weights, ``AutoModel`` would initialise it at random. It is written as the identity with a linear
    activation instead, so ``pooler_output`` is the final-normed CLS token and nothing is random."""
    p_t, p_f = (int(p) for p in cfg.patch_size)
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": mlp_hidden,
        "hidden_act": "gelu",  # transformers' "gelu" is the exact (erf) one
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": LN_EPS,
        "image_size": [chunk, cfg.n_mels],
        "patch_size": [p_t, p_f],
        "num_channels": 1,
        "qkv_bias": True,
        "encoder_stride": p_t,
        "pooler_act": "linear",
        "pooler_output_size": cfg.width,
        "torch_dtype": "float32",
    }


def ast_feature_extractor(features: str, chunk: int) -> dict:
    """``preprocessor_config.json``: an ``ASTFeatureExtractor`` computing the run's Kaldi fbank
    (``htk_compat``, Hann window, no dither, 25 ms / 10 ms frames — the same call our fbank reproduces),
    padded or cut to ``chunk`` frames and normalised ``(x − mean) / (2 · std)``, as our feature set."""
    fs = feature_sets.get(features)
    if fs.kind != "kaldi_fbank":
        raise HFExportError(
            f"feature set {features!r} is not a Kaldi fbank: ASTFeatureExtractor cannot compute it"
        )
    std = 1.0 / (2.0 * fs.scale)  # the feature set stores x · scale + offset = (x − mean) / (2 · std)
    mean = -fs.offset / fs.scale
    return {
        "feature_extractor_type": "ASTFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": fs.sample_rate,
        "num_mel_bins": fs.n_mels,
        "max_length": chunk,
        "padding_value": 0.0,
        "do_normalize": True,
        "mean": round(mean, 7),
        "std": round(std, 7),
        "return_attention_mask": False,
    }


def _vit_files(config: dict, enc, step: int, encoder: str, inputs=None):
    from atst_jax.models.encoder import EncoderConfig

    cfg = EncoderConfig.from_config(config["model"])
    if convert.norm_style(enc) == "post":
        raise HFExportError("model.norm_style='post': transformers' ViTModel is pre-norm; export safetensors")
    if enc.get("aape") is not None:
        raise HFExportError("this encoder has an AaPE branch, which transformers' ViTModel lacks")
    chunk = inference.encoder_chunk_frames(cfg, config, inputs)
    p_t, p_f = cfg.patch_size
    n_f = cfg.n_mels // p_f
    if cfg.pos_embed == "sincos2d" and cfg.use_cls:  # fixed positions, written out as a table
        enc = dict(enc, pos_embed=convert.sincos_pos_embed(chunk // p_t, n_f, cfg.width))
    try:
        sd = convert.vit_to_torch(enc, cfg.patch_size)
    except ValueError as e:
        raise HFExportError(f"model.stem='patch2d' with pos_embed={cfg.pos_embed!r}: {e}") from e
    # ViTModel adds its position table whole, so it holds exactly the chunk's patches (the first ones: the
    # JAX encoder also takes the first positions for inputs shorter than the table).
    sd["pos_embed"] = np.asarray(sd["pos_embed"])[:, : 1 + chunk // p_t * n_f]
    mlp_hidden = int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0])
    features = inference.run_features(config, cfg, inputs)
    files = {
        "config.json": vit_config(cfg, chunk, mlp_hidden),
        "preprocessor_config.json": ast_feature_extractor(features, chunk),
    }
    variant = {
        "architecture": "transformers ViTModel (2-D 16×16 patches, one channel)",
        "input": f"pixel_values [B, 1, {chunk}, {cfg.n_mels}]: ASTFeatureExtractor output with a channel axis",
        "features": features,
        "chunk_frames": chunk,
    }
    return vit_to_hf(sd, cfg.depth), files, variant, (cfg.width, cfg.depth, cfg.heads)


# ----------------------------------------------------------------------------------------------------------
# FrameAST → trust_remote_code model
# ----------------------------------------------------------------------------------------------------------

CONFIGURATION_ATST = '''"""Configuration of the ATST FrameAST encoder (ATST-Frame; ATST-Clip with use_cls)."""

from transformers import PretrainedConfig


class ATSTConfig(PretrainedConfig):
    model_type = "atst_frame_ast"

    def __init__(
        self,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mlp_ratio=4.0,
        n_mels=64,
        patch_w=4,
        num_pos=251,
        use_cls=False,
        layer_norm_eps=1e-6,
        chunk_frames=1000,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.n_mels = n_mels
        self.patch_w = patch_w
        self.num_pos = num_pos
        self.use_cls = use_cls
        self.layer_norm_eps = layer_norm_eps
        self.chunk_frames = chunk_frames
        super().__init__(**kwargs)
'''

MODELING_ATST = '''"""The ATST FrameAST encoder as a transformers PreTrainedModel.

Input: the normalised 64-bin log-mel ``input_values [B, n_mels, T]`` (or ``[B, 1, n_mels, T]``) and
optionally ``lengths [B]``, the valid frames (padded tokens are masked as keys). Every ``patch_w`` frames
give one token (a Linear over the patch flattened mel-major); positions take slots ``1..N`` of ``pos_embed``
(slot 0 belongs to the CLS token when there is one). Pre-norm blocks, exact GELU; the output is the tokens
(CLS first when ``use_cls``) through the final LayerNorm. The parameter names are the official FrameAST's.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_atst import ATSTConfig

PAD_LOGIT = -10000.0


class PatchEmbed(nn.Module):
    def __init__(self, n_mels, patch_w, width):
        super().__init__()
        self.patch_w = patch_w
        self.patch_embed = nn.Linear(n_mels * patch_w, width)

    def forward(self, spec):
        b, f, t = spec.shape
        n = t // self.patch_w
        x = spec[:, :, : n * self.patch_w].reshape(b, f, n, self.patch_w)
        # The weight's inputs are ordered mel-major: index mel * patch_w + frame.
        return self.patch_embed(x.permute(0, 2, 1, 3).reshape(b, n, f * self.patch_w))


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x, key_bias):
        b, n, d = x.shape
        # qkv rows are [q; k; v], each split head-major.
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        logits = (qkv[0] * self.scale) @ qkv[1].transpose(-2, -1) + key_bias[:, None, None, :]
        out = logits.softmax(dim=-1) @ qkv[2]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x, key_bias):
        x = x + self.attn(self.norm1(x), key_bias)
        return x + self.mlp(self.norm2(x))


class ATSTModel(PreTrainedModel):
    config_class = ATSTConfig
    base_model_prefix = "atst"
    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        if config.use_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Used only in pretraining (masked tokens); kept so the official keys load strictly.
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_pos, d))
        self.patch_embed = PatchEmbed(config.n_mels, config.patch_w, d)
        self.blocks = nn.ModuleList(
            [
                Block(d, config.num_attention_heads, config.mlp_ratio, config.layer_norm_eps)
                for _ in range(config.num_hidden_layers)
            ]
        )
        if config.use_cls:
            self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        else:
            self.norm_frame = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module):
        # Every parameter comes from the checkpoint; fresh models keep torch's defaults.
        pass

    @property
    def final_norm(self):
        return self.norm if self.config.use_cls else self.norm_frame

    def forward(self, input_values, lengths=None, output_hidden_states=None, return_dict=None):
        spec = input_values.squeeze(1) if input_values.dim() == 4 else input_values
        b, _, t = spec.shape
        if lengths is None:
            lengths = torch.full((b,), t, device=spec.device)
        x = self.patch_embed(spec)
        n = x.shape[1]
        if n + 1 > self.pos_embed.shape[1]:
            raise ValueError(f"{n} tokens exceed the {self.pos_embed.shape[1] - 1} positions")
        x = x + self.pos_embed[:, 1 : n + 1]
        valid = torch.div(lengths, self.config.patch_w, rounding_mode="floor")
        if self.config.use_cls:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
            x = torch.cat([cls, x], dim=1)
            valid = valid + 1
        pos = torch.arange(x.shape[1], device=x.device)
        key_bias = torch.where(pos[None, :] < valid[:, None], 0.0, PAD_LOGIT).to(x.dtype)
        hidden = [x] if output_hidden_states else None
        for blk in self.blocks:
            x = blk(x, key_bias)
            if hidden is not None:
                hidden.append(x)
        out = BaseModelOutput(
            last_hidden_state=self.final_norm(x), hidden_states=tuple(hidden) if hidden else None
        )
        return out if return_dict is not False else out.to_tuple()
'''


def _frame_files(config: dict, enc, step: int, encoder: str, inputs=None):
    if convert.norm_style(enc) == "post":
        raise HFExportError("model.norm_style='post': the ATST FrameAST layout is pre-norm")
    if convert.has_qkv_bias(enc):
        raise HFExportError("this frame-stem encoder has a qkv bias, which the FrameAST layout lacks")
    if enc.get("aape") is not None:
        raise HFExportError("this encoder has an AaPE branch (model.aape): export safetensors instead")
    sd = convert.encoder_to_torch(enc)
    qkv = enc["blocks"]["attn"]["qkv"]["kernel"]  # [L, D, 3, H, hd]
    depth, width, heads = int(qkv.shape[0]), int(qkv.shape[1]), int(qkv.shape[3])
    clip = convert.is_clip(enc)
    num_pos = int(np.shape(sd["pos_embed"])[1])
    n_mels_x_w = int(np.shape(sd["patch_embed.patch_embed.weight"])[1])
    patch_w = int(((config or {}).get("model") or {}).get("patch_w", 4))
    chunk = inference.run_chunk_frames(config, clip, patch_w=patch_w, num_pos=num_pos, inputs=inputs)
    cfg_json = {
        "architectures": ["ATSTModel"],
        "model_type": "atst_frame_ast",
        "auto_map": {
            "AutoConfig": "configuration_atst.ATSTConfig",
            "AutoModel": "modeling_atst.ATSTModel",
        },
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "mlp_ratio": int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0]) / width,
        "n_mels": n_mels_x_w // patch_w,
        "patch_w": patch_w,
        "num_pos": num_pos,
        "use_cls": clip,
        "layer_norm_eps": LN_EPS,
        "chunk_frames": chunk,
        "torch_dtype": "float32",
    }
    files = {
        "config.json": cfg_json,
        "configuration_atst.py": CONFIGURATION_ATST,
        "modeling_atst.py": MODELING_ATST,
    }
    variant = {
        "architecture": "ATST FrameAST ("
        + ("ATST-Clip, CLS token" if clip else "ATST-Frame")
        + "), remote code",
        "input": f"input_values [B, {n_mels_x_w // patch_w}, frames] normalised log-mel, optional lengths [B]",
        "features": "atst_logmel64",
        "chunk_frames": chunk,
    }
    return sd, files, variant, (width, depth, heads)


# ----------------------------------------------------------------------------------------------------------
# Model card and the directory
# ----------------------------------------------------------------------------------------------------------


def _compute_lines(compute, platform=None) -> list[str]:
    """The card's lines on what training cost: the checkpoint metadata's ``compute`` entry (totals over every
    start of the run up to the exported step; ``metrics.ComputeMeter``)."""
    if not isinstance(compute, dict) or compute.get("device_hours") is None:
        return ["- Training compute: not recorded"]
    devices, chip = compute.get("devices"), compute.get("chip")
    hours = f"- Device-hours: {compute['device_hours']:.4g} (wall time × devices"
    if devices:
        hours += f"; {devices} × {chip or platform or 'device'} in the last start"
    segments, timed = int(compute.get("segments") or 1), int(compute.get("timed_from_step") or 0)
    if segments > 1:
        hours += f"; over {segments} starts of the run"
    if timed:
        hours += f"; counted from step {timed}, its checkpoint had no totals"
    flops = f"- Training FLOPs: {float(compute['flops']):.3e} (analytic"
    if compute.get("step_flops") and compute.get("step") is not None:
        flops += f": {float(compute['step_flops']):.3e} per step × {compute['step']} steps"
    mfu = compute.get("mfu_mean")
    return [
        hours + ")",
        flops + ")",
        f"- Mean MFU: {mfu * 100:.3g}%"
        if mfu is not None
        else "- Mean MFU: not meaningful (no stated peak FLOP/s for the hardware it ran on)",
    ]


def model_card(workdir, config: dict, step: int, encoder: str, variant: dict, size, n_params: int) -> str:
    from atst_jax.checkpoint import read_meta

    width, depth, heads = size
    config = config or {}
    batch = (config.get("train") or {}).get("global_batch")
    clips = f"{step * int(batch):,} ({step} × global batch {batch})" if batch else "not recorded"
    meta = read_meta(workdir, step)  # {} when absent or unreadable: the card says so
    data = meta.get("data") or {}
    fingerprint = data.get("fingerprint") or "not recorded"
    if data.get("subset_fingerprint"):
        fingerprint += f"; the run's subset of {data.get('clips')} clips: {data['subset_fingerprint']}"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [audio, self-supervised]",
        "---",
        "",
        f"# {config.get('method', 'unknown method')} encoder ({encoder})",
        "",
        f"- Method: {config.get('method', 'not recorded')}",
        f"- Architecture: {variant['architecture']}",
        f"- Model size: width {width}, depth {depth}, heads {heads}; {n_params:,} parameters",
        f"- Config variant: {config.get('variant') or config.get('config_name') or 'not recorded'}",
        f"- Steps trained: {step}",
        f"- Clips seen: {clips}",
        f"- Data fingerprint: {fingerprint}",
        *_compute_lines(meta.get("compute"), meta.get("platform")),
        f"- Input: {variant['input']}",
        f"- Front end: {variant['features']}; chunk of {variant['chunk_frames']} frames",
        "",
    ]
    results = Path(workdir) / "probe" / "RESULTS.json"
    if results.is_file():
        try:
            body = json.dumps(json.loads(results.read_text()), indent=2, sort_keys=True)
        except ValueError:
            body = None
        if body is not None:
            lines += ["## Evaluation (probe/RESULTS.json)", "", "```json", body, "```", ""]
    else:
        lines += ["## Evaluation", "", "No probe results were recorded for this run.", ""]
    return "\n".join(lines)


def write_dir(workdir, config: dict, state, step: int, encoder: str, out: Path) -> None:
    """Writes the model directory ``out`` (which must not exist yet)."""
    from safetensors.numpy import save_file

    from atst_jax.checkpoint import recorded_inputs

    try:
        layout = export_layout((config or {}).get("model"))
    except ValueError as e:
        raise HFExportError(str(e)) from e
    enc = state["teacher" if encoder == "teacher" else "params"]["encoder"]
    files_of = {"vit": _vit_files, "frameast": _frame_files}[layout]
    # The trained crops as the checkpoint records them (None for one older than the entry: from the config).
    sd, files, variant, size = files_of(config, enc, step, encoder, recorded_inputs(workdir, step))
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}
    n_params = sum(int(v.size) for k, v in tensors.items() if not k.startswith("pooler."))
    out.mkdir(parents=True)
    # transformers refuses safetensors files whose "format" metadata is not a framework it knows.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name, content in files.items():
        text = json.dumps(content, indent=2) + "\n" if isinstance(content, dict) else content
        (out / name).write_text(text)
    (out / "README.md").write_text(model_card(workdir, config, step, encoder, variant, size, n_params))
