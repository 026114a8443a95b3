"""AaPE in PyTorch (written from ``atst_jax/models/aape.py``'s formulas, not translated line by line) and the two
encoders that carry it: ``AaPEViT`` (the 2-D patch ViT of ``torch_vit`` + AaPE: AaSP exports) and
``AaPEFrameAST`` (``torch_encoder.FrameAST`` + AaPE: ``configs/atst_frame_aape.py`` exports).

Key layout: the encoder's own keys (the official ViT's 12·depth + 6, or FrameAST's 138 / 139) plus the
``aape.*`` keys of the table in ``atst_jax/export/convert.py`` (9, or 11 with ``feature_norm``). The AaPE
configuration is not in the weights: our safetensors exports store it as JSON under the metadata key
``aape``; pass it as ``aape=`` (a dict of ``AapeConfig`` fields). Both classes load with
``load_state_dict(strict=True)``; ``from_state_dict`` builds the module from the shapes and the config.

A 2-D sin-cos ViT (AaSP's, ``model.pos_embed="sincos2d"``) is exported with its fixed positions written into
``pos_embed`` (slot 0, the CLS token's, zero): the ViT adds ``pos_embed`` as a learned one would, exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atst_jax.export.torch_encoder import FrameAST
from atst_jax.export.torch_vit import VisionTransformer

LN_EPS = 1e-6


def sblu(u, alpha, omega, b, c, taps: int, delta: float = 1.0):
    """The SBLU on ``u [B, S, T]`` with ``alpha, omega, b, c [B|1, S, K]``: ``(Re y, Im y) [B, S, K, T]``, as
    complex arithmetic (``torch.complex64``) — an independent form of the JAX real-arithmetic version."""
    centre = (taps - 1) // 2
    lam = torch.complex(alpha, omega)  # Λ = α + iω
    dist = (torch.arange(taps, dtype=u.dtype, device=u.device) - centre).abs()
    h = torch.exp(-delta * lam[..., None] * dist)  # [B, S, K, taps]
    gain = 2.0 * c * b * torch.sinh(delta * lam / 2) / lam  # [B, S, K]
    win = nn.functional.pad(u, (centre, centre)).unfold(-1, taps, 1)  # [B, S, T, taps]: u[n + k − c]
    z = torch.einsum("bstm,bskm->bskt", win.to(h.dtype), h)
    y = gain[..., None] * z
    return y.real, y.imag


class AaPE(nn.Module):
    """The AaPE branch: ``spec [B, n_mels, T] → [B, N, D]``, added to the patch projection."""

    def __init__(self, config: dict, *, n_mels: int, stride: int, token_bins: int, width: int):
        super().__init__()
        cfg = dict(config)
        self.subband_bins, self.kernels, self.taps = (
            int(cfg["subband_bins"]),
            int(cfg["kernels"]),
            int(cfg["taps"]),
        )
        self.delta, self.stat_bins = float(cfg["delta"]), int(cfg["stat_bins"])
        self.alpha_min, self.envelope_norm = float(cfg["alpha_min"]), bool(cfg["envelope_norm"])
        self.features = tuple(cfg["features"])
        self.stride, self.token_bins = int(stride), int(token_bins)
        self.n_sub = n_mels // self.subband_bins
        k, hidden = self.kernels, int(cfg["hidden"])
        self.lambda_fc1 = nn.Linear(self.stat_bins, hidden)
        self.lambda_fc2 = nn.Linear(hidden, 2 * k)
        self.band_bias = nn.Parameter(torch.zeros(self.n_sub, k, 2))
        self.gain_b = nn.Parameter(torch.ones(self.n_sub, k))
        self.gain_c = nn.Parameter(torch.ones(self.n_sub, k))
        dim = (token_bins // self.subband_bins) * k * len(self.features)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS) if cfg["feature_norm"] else None
        self.fuse = nn.Linear(dim, width)

    def forward(self, spec, length=None):
        b, f, t = spec.shape
        t = t // self.stride * self.stride
        u = spec[:, :, :t].float().reshape(b, self.n_sub, f // self.n_sub, t).mean(dim=2)
        # Statistics over the valid tokens' frames only, 0 past them (padding-invariant, as the JAX stem).
        if length is None:
            valid = torch.full((b,), t, device=u.device)
        else:
            valid = torch.clamp(torch.as_tensor(length, device=u.device) // self.stride * self.stride, max=t)
        w = (torch.arange(t, device=u.device)[None, :] < valid[:, None]).float()[:, None]
        count = w.sum(dim=-1, keepdim=True).clamp(min=1.0)
        if self.envelope_norm:
            u = u - (u * w).sum(dim=-1, keepdim=True) / count
            u = u * torch.rsqrt((u.square() * w).sum(dim=-1, keepdim=True) / count + 1e-5)
        u = u * w
        # Lambda encoder: log |DFT| of each envelope at θ_j = π (j + 1) / stat_bins, per √T.
        theta = (
            math.pi
            * (torch.arange(self.stat_bins, device=u.device, dtype=torch.float64) + 1)
            / self.stat_bins
        )
        n = torch.arange(t, device=u.device, dtype=torch.float64)[:, None]
        basis = torch.exp(-1j * n * theta).to(torch.complex64)  # cos − i·sin
        spec_mod = torch.einsum("bst,tj->bsj", u.to(torch.complex64), basis)
        stats = 0.5 * torch.log(spec_mod.abs().square() + 1e-6) - 0.5 * torch.log(count)
        raw = self.lambda_fc2(nn.functional.gelu(self.lambda_fc1(stats)))
        raw = raw.reshape(b, self.n_sub, self.kernels, 2) + self.band_bias
        lo = math.pi / self.stride
        alpha = self.alpha_min + nn.functional.softplus(raw[..., 0])
        omega = lo + (math.pi - lo) * torch.sigmoid(raw[..., 1])
        y_re, y_im = sblu(u, alpha, omega, self.gain_b, self.gain_c, self.taps, self.delta)
        parts = {"real": y_re, "imag": y_im, "abs": torch.sqrt(y_re.square() + y_im.square() + 1e-12)}
        feats = torch.stack([parts[name] for name in self.features], dim=-1)  # [B, S, K, T, nf]
        n_t = t // self.stride
        feats = feats.reshape(b, self.n_sub, self.kernels, n_t, self.stride, -1).mean(dim=4)
        spt = self.token_bins // self.subband_bins
        n_f = self.n_sub // spt
        feats = feats.reshape(b, n_f, spt, self.kernels, n_t, -1).permute(0, 4, 1, 2, 3, 5)
        x = feats.reshape(b, n_t * n_f, -1)
        if self.norm is not None:
            x = self.norm(x)
        return self.fuse(x)


class AaPEViT(VisionTransformer):
    """``torch_vit.VisionTransformer`` with an ``aape`` branch on its patch tokens (input ``[B, 1, T, n_mels]``)."""

    def aape_tokens(self, x, length=None):
        if x.dim() == 3:
            x = x[:, None]
        return self.aape(x[:, 0].transpose(1, 2), length)

    @classmethod
    def from_state_dict(cls, sd, aape: dict, heads=None, n_mels: int = 128, strict: bool = True):
        base = {k: v for k, v in sd.items() if not k.startswith("aape.")}
        model = super().from_state_dict(base, heads=heads, n_mels=n_mels, strict=True)
        p_t, p_f = model.patch_embed.patch_size
        model.aape = AaPE(aape, n_mels=n_mels, stride=p_t, token_bins=p_f, width=model.width)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=strict)
        return model


class AaPEFrameAST(FrameAST):
    """``torch_encoder.FrameAST`` with an ``aape`` branch on its frame tokens (input ``[B, n_mels, T]``)."""

    def aape_tokens(self, spec, length=None):
        return self.aape(spec, length)

    @classmethod
    def from_state_dict(cls, sd, aape: dict, heads=None, strict: bool = True):
        base = {k: v for k, v in sd.items() if not k.startswith("aape.")}
        model = super().from_state_dict(base, heads=heads, strict=True)
        n_mels = sd["patch_embed.patch_embed.weight"].shape[1] // model.patch_w
        model.aape = AaPE(aape, n_mels=n_mels, stride=model.patch_w, token_bins=n_mels, width=model.width)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=strict)
        return model
