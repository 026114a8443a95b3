"""AaPE: an aliasing-aware patch embedding (AaSP, Yamamoto & Okusa, arXiv 2512.03637; spec/methods.md §5).

Why: a patch stem that strides P frames over time lowers the modulation Nyquist of the token sequence from
π to π/P rad/frame; modulations of the log-mel envelope in (π/P, π] (e.g. 12.5–50 Hz for P = 4 at a 10 ms
hop) alias into the tokens or are averaged away. AaPE **adds** features from that band to the ordinary
patch tokens; it does not replace the patch projection.

Published (the paper's abstract and kernel formula): the "structured bilateral Laplace unit" (SBLU) filters a
subband envelope ``u`` with a band-limited complex sinusoid under a two-sided exponential window,

    y[n] = 2·C·Λ⁻¹·sinh(ΔΛ/2) · Σ_{k=0}^{K−1} exp(−ΔΛ·|k − c|) · B · u[n + k − c],   Λ = α + iω, α > 0,

whose decay α and frequency ω are estimated from the input by a "lambda encoder"; the outputs are fused with
the standard patch tokens. The window is two-sided, so the taps are even in ``k − c`` and the magnitude
response peaks at ±ω for any ω (a usable ∂/∂ω over the whole band).

Reconstructed here (no public code; every choice is a field of ``AapeConfig``):

- Subbands: the mel bins in groups of ``subband_bins`` (default 16 = one row of 16×16 patches; a 64-bin
  frame stem uses 8 → 8 subbands per token). ``u`` = the group's mean of the normalised log-mel, then
  standardised over time per clip (``envelope_norm``), so the filters see the envelope's modulation and not
  its level. Statistics, the modulation spectrum and the SBLU's zero padding cover only the frames the
  branch may see (below).
- Lambda encoder: per subband the log-magnitude modulation spectrum of ``u`` at ``stat_bins`` frequencies
  evenly spaced in (0, π] (a DFT as two fixed matmuls) → ``Linear → GELU → Linear`` (shared over subbands) +
  a learned per-subband bias → ``kernels`` pairs; ``α = alpha_min + softplus(·)``, ``ω = π/P + (π − π/P)·
  sigmoid(·)``, i.e. strictly inside the alias-prone band. The output bias starts the ω of the ``kernels``
  kernels evenly over the band and α at ``alpha_init``; the output weights start small (trunc-normal 0.02),
  so the estimate starts near those and becomes input-dependent as it trains.
- K = ``taps`` (odd, default 33), c = (K − 1)/2, Δ = ``delta`` = 1 frame; zero padding at the crop's edges
  (zero = the standardised envelope's mean). B and C are learned per subband and kernel (init 1).
- Features: ``[Re(y), |y|]`` per subband and kernel, average-pooled over each token's P frames, in the
  stem's token order (time-major; a token of a 2-D stem sees the subbands of its mel rows, a frame token all
  subbands) → LayerNorm (``feature_norm``) → ``fuse: Linear(features → D)`` initialised to **zero**, added to
  the patch projection before the mask token and the positions. With ``fuse`` at zero the stem is exactly
  the plain patch embedding, so training starts as a plain ViT / FrameAST.

What the branch sees: a (subband, frame) is visible when the frame lies in the clip's whole valid tokens
(``length``) and the token holding it is not hidden by ``mask [B, N]`` (the student's mask, in the stem's
token order). Hidden entries are left out of the envelope's mean and std, contribute nothing to the
modulation spectrum (normalised by the visible count), and are zero in the envelope the SBLU convolves —
selected with ``where``, so whatever lies under a mask (even inf / nan) cannot reach any output. Why: the
branch is a ``taps``-long filter (33) plus whole-clip statistics; computed on the unmasked crop it would
carry the content of masked frames into the student's visible tokens, and the student must predict that
content without seeing it. The teacher (no mask) sees the whole clip. Padding is the same mechanism, so a
clip's features do not depend on how far it was padded (as the trunk's key masking does not). Masked
tokens' own outputs are whatever the visible content gives (the stem replaces them by ``mask_embed`` or
drops them).

Numerics: everything here runs in float32 whatever the compute dtype (the kernel's exponentials and the
complex gain are badly conditioned in bf16); the fused output is cast to the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax.models.layers import LayerNorm, Linear, gelu_exact

FEATURES = ("real", "abs")


@dataclasses.dataclass(frozen=True)
class AapeConfig:
    subband_bins: int = 16  # mel bins per subband (u = their mean); must divide a token's mel rows
    kernels: int = 4  # SBLU kernels (α, ω pairs) per subband
    taps: int = 33  # K, odd; the kernel is centred at c = (K − 1) / 2
    delta: float = 1.0  # Δ, the sampling step of the envelope in frames
    stat_bins: int = 16  # modulation-spectrum frequencies the lambda encoder reads, evenly in (0, π]
    hidden: int = 64  # lambda encoder hidden width
    alpha_init: float = 0.1  # initial decay (per frame): a window of ≈ 1/α ≈ 10 frames each side
    alpha_min: float = 1e-3  # α > 0 strictly
    envelope_norm: bool = True  # standardise each subband envelope over time, per clip
    feature_norm: bool = True  # LayerNorm on each token's AaPE features before the fusion projection
    features: tuple[str, ...] = FEATURES  # any of real | abs | imag

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        if self.taps < 1 or self.taps % 2 == 0:
            raise ValueError(f"model.aape.taps={self.taps} must be odd and positive")
        if not self.features or any(f not in ("real", "abs", "imag") for f in self.features):
            raise ValueError(f"model.aape.features={self.features}: choose from real, abs, imag")
        if self.kernels < 1 or self.subband_bins < 1 or self.stat_bins < 1 or self.hidden < 1:
            raise ValueError("model.aape: kernels, subband_bins, stat_bins and hidden must be positive")
        if not (self.alpha_min > 0 and self.alpha_init > self.alpha_min and self.delta > 0):
            raise ValueError("model.aape: need 0 < alpha_min < alpha_init and delta > 0")

    @classmethod
    def coerce(cls, value):
        """``None`` (no AaPE), an ``AapeConfig``, or a mapping of its fields (a ConfigDict, saved JSON)."""
        if value is None or isinstance(value, cls):
            return value
        fields = {f.name for f in dataclasses.fields(cls)}
        value = dict(value)
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"model.aape: unknown field(s) {unknown}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def stem_geometry(enc) -> tuple[int, int]:
    """``(P, token_bins)`` of an ``EncoderConfig``'s stem: the temporal stride in frames and the mel bins one
    token covers (frame stem: ``patch_w`` and all bins; 2-D stem: the patch's time and mel sizes)."""
    if enc.stem == "patch2d":
        return int(enc.patch_size[0]), int(enc.patch_size[1])
    return int(enc.patch_w), int(enc.n_mels)


def alias_band(stride: int) -> tuple[float, float]:
    """The alias-prone modulation band ``(π/P, π]`` in rad/frame."""
    return math.pi / stride, math.pi


def feature_dim(cfg: AapeConfig, token_bins: int) -> int:
    return (token_bins // cfg.subband_bins) * cfg.kernels * len(cfg.features)


def sblu(u, alpha, omega, b, c, *, taps: int, delta: float = 1.0):
    """The SBLU on envelopes ``u [..., S, T]`` with per-kernel ``alpha, omega, b, c [..., S, K]``.

    Returns ``(Re y, Im y)``, each ``[..., S, K, T]``: ``y[n] = 2CΛ⁻¹ sinh(ΔΛ/2) Σ_k e^{−ΔΛ|k−c|} B u[n+k−c]``
    with zero padding outside ``0 … T−1``. Written in real arithmetic (no complex dtypes: they shard and
    differentiate like any float here).
    """
    u = u.astype(jnp.float32)
    t = u.shape[-1]
    centre = (taps - 1) // 2
    dist = jnp.abs(jnp.arange(taps, dtype=jnp.float32) - centre)  # |k − c|
    a = (delta * alpha.astype(jnp.float32))[..., None]  # [..., S, K, 1]
    w = (delta * omega.astype(jnp.float32))[..., None]
    decay = jnp.exp(-a * dist)
    h_re, h_im = decay * jnp.cos(w * dist), -decay * jnp.sin(w * dist)  # e^{−ΔΛ|m|}
    # Gain 2·C·sinh(ΔΛ/2)/Λ: sinh(x + iy) = sinh x cos y + i cosh x sin y; 1/Λ = (α − iω)/(α² + ω²).
    al, om = alpha.astype(jnp.float32), omega.astype(jnp.float32)
    x, y = 0.5 * delta * al, 0.5 * delta * om
    s_re, s_im = jnp.sinh(x) * jnp.cos(y), jnp.cosh(x) * jnp.sin(y)
    den = al * al + om * om
    scale = 2.0 * c.astype(jnp.float32) * b.astype(jnp.float32) / den
    g_re, g_im = scale * (s_re * al + s_im * om), scale * (s_im * al - s_re * om)
    # Windows u[n + k − c], k = 0..K−1: [..., S, T, K].
    padded = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(centre, centre)])
    win = jnp.stack([padded[..., k : k + t] for k in range(taps)], axis=-1)
    z_re = jnp.einsum("...stm,...skm->...skt", win, h_re)
    z_im = jnp.einsum("...stm,...skm->...skt", win, h_im)
    g_re, g_im = g_re[..., None], g_im[..., None]
    return g_re * z_re - g_im * z_im, g_re * z_im + g_im * z_re


def modulation_dft(frames: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin [frames, bins]`` at ``θ_j = π (j + 1) / bins`` (the lambda encoder's statistics)."""
    theta = np.pi * (np.arange(bins) + 1) / bins
    n = np.arange(frames)[:, None]
    return np.cos(n * theta).astype(np.float32), np.sin(n * theta).astype(np.float32)


def _inv_softplus(y: float) -> float:
    return float(y + np.log(-np.expm1(-y)))


class AaPE(nnx.Module):
    """The AaPE branch of a patch stem (see the module docstring): ``spec [B, F, T] → [B, N, D]``, to be added
    to the patch projection of the same crop. Parameters: ``lambda_fc1``, ``lambda_fc2``, ``band_bias``,
    ``gain_b``, ``gain_c``, ``norm`` (with ``feature_norm``), ``fuse``."""

    def __init__(self, cfg: AapeConfig, *, n_mels: int, stride: int, token_bins: int, width: int, rngs):
        if n_mels % cfg.subband_bins or token_bins % cfg.subband_bins:
            raise ValueError(
                f"model.aape.subband_bins={cfg.subband_bins} must divide n_mels={n_mels} and the "
                f"{token_bins} mel bins of a token"
            )
        self.cfg, self.stride, self.token_bins = cfg, int(stride), int(token_bins)
        self.n_sub = n_mels // cfg.subband_bins
        k = cfg.kernels
        self.lambda_fc1 = Linear(cfg.stat_bins, cfg.hidden, axes=("aape_stat", "aape_hidden"), rngs=rngs)
        self.lambda_fc2 = Linear(cfg.hidden, (k, 2), axes=("aape_hidden", None, None), rngs=rngs)
        # Start: α at alpha_init, the K frequencies evenly inside the band (sigmoid⁻¹ of (i + ½)/K).
        frac = (np.arange(k) + 0.5) / k
        init = np.stack(
            [np.full(k, _inv_softplus(cfg.alpha_init - cfg.alpha_min)), np.log(frac / (1 - frac))], -1
        )
        self.lambda_fc2.bias[...] = jnp.asarray(init, jnp.float32)
        self.band_bias = nnx.Param(jnp.zeros((self.n_sub, k, 2), jnp.float32), axes=(None, None, None))
        self.gain_b = nnx.Param(jnp.ones((self.n_sub, k), jnp.float32), axes=(None, None))
        self.gain_c = nnx.Param(jnp.ones((self.n_sub, k), jnp.float32), axes=(None, None))
        dim = feature_dim(cfg, token_bins)
        self.norm = LayerNorm(dim, axis_name="aape_feat") if cfg.feature_norm else None
        self.fuse = Linear(dim, width, axes=("aape_feat", "embed"), rngs=rngs)
        self.fuse.kernel[...] = jnp.zeros((dim, width), jnp.float32)  # training starts as the plain stem

    # --- parts -------------------------------------------------------------------------------------------
    def valid_frames(self, length, frames: int):
        """``[B]`` frames of whole valid tokens (the stem's own rule) of a crop of ``frames``; all without
        ``length``."""
        if length is None:
            return None
        return jnp.minimum((jnp.asarray(length) // self.stride) * self.stride, frames).astype(jnp.int32)

    def visibility(self, frames: int, length=None, mask=None):
        """``[B', S | 1, frames]`` bool: which (subband, frame) of the whole patches' ``frames`` the branch
        may read (True), or None (all). ``length [B]`` (valid frames) keeps the clip's whole valid tokens;
        ``mask [B', N]`` (True = hidden, the stem's time-major tokens ``t · n_f + f``) hides each token's P
        frames of its subbands. ``B'`` may be ``M · B`` (M masked copies per clip, clip-major rows)."""
        vis = None
        valid = self.valid_frames(length, frames)
        if valid is not None:
            vis = (jnp.arange(frames) < valid[:, None])[:, None]  # [B, 1, T']
        if mask is None:
            return vis
        spt = self.token_bins // self.cfg.subband_bins  # subbands per token
        n_t, n_f = frames // self.stride, self.n_sub // spt
        mask = jnp.asarray(mask, bool)
        if mask.ndim != 2 or mask.shape[1] != n_t * n_f:
            raise ValueError(f"AaPE: mask {mask.shape} does not match the {n_t} x {n_f} tokens of the crop")
        hidden = mask.reshape(mask.shape[0], n_t, n_f).transpose(0, 2, 1)  # [B', n_f, n_t]
        seen = ~jnp.repeat(jnp.repeat(hidden, spt, axis=1), self.stride, axis=2)  # [B', S, T']
        if vis is None:
            return seen
        return jnp.repeat(vis, _copies(mask.shape[0], vis.shape[0]), axis=0) & seen

    def envelopes(self, spec, length=None, mask=None):
        """Subband envelopes ``u [B', S, T']`` of the whole patches' frames ``T' = (T // P) · P``.

        The statistics cover the visible entries only (``visibility``: valid and not hidden by ``mask``)
        and ``u`` is 0 at the others (as past the crop's end). With a mask of ``M · B`` rows the clip's
        envelope is computed once and standardised per copy."""
        b, f, t = spec.shape
        t = (t // self.stride) * self.stride
        u = spec[:, :, :t].astype(jnp.float32).reshape(b, self.n_sub, f // self.n_sub, t).mean(axis=2)
        vis = self.visibility(t, length, mask)
        if vis is None:
            vis = jnp.ones((b, 1, t), bool)
        u = jnp.repeat(u, _copies(vis.shape[0], b), axis=0)
        count = jnp.maximum(jnp.sum(vis, axis=-1, keepdims=True, dtype=jnp.float32), 1.0)
        if self.cfg.envelope_norm:
            u = u - jnp.sum(jnp.where(vis, u, 0.0), axis=-1, keepdims=True) / count
            var = jnp.sum(jnp.where(vis, jnp.square(u), 0.0), axis=-1, keepdims=True) / count
            u = u * jax.lax.rsqrt(var + 1e-5)
        return jnp.where(vis, u, 0.0)

    def lambdas(self, u, length=None, mask=None):
        """``alpha, omega [B', S, K]`` estimated from the envelopes ``u [B', S, T]``: the modulation spectrum
        over the visible frames (``visibility``; the others count as 0), normalised by their number."""
        cfg = self.cfg
        vis = self.visibility(u.shape[-1], length, mask)
        if vis is not None:
            u = jnp.where(vis, u, 0.0)  # already so for ``envelopes``' output; any other u too
        cos, sin = modulation_dft(u.shape[-1], cfg.stat_bins)
        re, im = u @ jnp.asarray(cos), u @ jnp.asarray(sin)
        if vis is None:
            count = u.shape[-1]
        else:
            count = jnp.maximum(jnp.sum(vis, axis=-1, keepdims=True, dtype=jnp.float32), 1.0)
        stats = 0.5 * jnp.log(re * re + im * im + 1e-6) - 0.5 * jnp.log(count)  # log |U(θ)| / √T
        raw = self.lambda_fc2(gelu_exact(self.lambda_fc1(stats))) + self.band_bias[...]
        lo, hi = alias_band(self.stride)
        alpha = cfg.alpha_min + jax.nn.softplus(raw[..., 0])
        omega = lo + (hi - lo) * jax.nn.sigmoid(raw[..., 1])
        return alpha, omega

    def token_features(self, spec, length=None, mask=None):
        """Pooled SBLU features ``[B', N, feature_dim]`` in the stem's (time-major) token order, computed from
        the visible entries only (``visibility``)."""
        cfg = self.cfg
        u = self.envelopes(spec, length, mask)
        alpha, omega = self.lambdas(u, length, mask)
        y_re, y_im = sblu(u, alpha, omega, self.gain_b[...], self.gain_c[...], taps=cfg.taps, delta=cfg.delta)
        parts = {
            "real": lambda: y_re,
            "imag": lambda: y_im,
            "abs": lambda: jnp.sqrt(y_re**2 + y_im**2 + 1e-12),
        }
        feats = jnp.stack([parts[name]() for name in cfg.features], axis=-1)  # [B, S, K, T, nf]
        b, s, k, t, nf = feats.shape
        n_t = t // self.stride
        feats = feats.reshape(b, s, k, n_t, self.stride, nf).mean(axis=4)  # pooled to the token grid
        spt = self.token_bins // cfg.subband_bins  # subbands per token
        n_f = s // spt
        feats = feats.reshape(b, n_f, spt, k, n_t, nf).transpose(0, 4, 1, 2, 3, 5)
        return feats.reshape(b, n_t * n_f, spt * k * nf)

    def __call__(self, spec, length=None, mask=None, keep=None):
        """``[B', N, D]``, or ``[B', V, D]`` for the tokens ``keep [B', V]`` only (the others are not fused)."""
        x = self.token_features(spec, length, mask)
        if keep is not None:
            x = jnp.take_along_axis(x, keep[..., None], axis=1)
        if self.norm is not None:
            x = self.norm(x)
        return self.fuse(x)


def _copies(rows: int, clips: int) -> int:
    """M for ``rows = M · clips`` (the masked copies of each clip, clip-major)."""
    if rows % clips:
        raise ValueError(f"AaPE: {rows} mask rows are not a whole number of copies of {clips} clips")
    return rows // clips


def make_aape(enc, rngs) -> AaPE:
    """The AaPE branch of an ``EncoderConfig`` with ``aape`` set."""
    stride, token_bins = stem_geometry(enc)
    return AaPE(enc.aape, n_mels=enc.n_mels, stride=stride, token_bins=token_bins, width=enc.width, rngs=rngs)


def aape_flops(enc, n_tokens: int, sequences: int, *, fused_tokens: int | None = None) -> float:
    """Forward matmul FLOPs of the AaPE branch on ``sequences`` crops of ``n_tokens`` patch tokens: the
    modulation DFT, the lambda encoder, the SBLU's two real convolutions and the fusion projection (on
    ``fused_tokens`` of them, default all: ``keep``)."""
    cfg = enc.aape
    stride, token_bins = stem_geometry(enc)
    n_f = enc.n_mels // token_bins
    frames = (n_tokens // n_f) * stride
    s, k = enc.n_mels // cfg.subband_bins, cfg.kernels
    per = 2 * s * frames * cfg.stat_bins * 2
    per += 2 * s * (cfg.stat_bins * cfg.hidden + cfg.hidden * 2 * k)
    per += 2 * s * frames * cfg.taps * k * 2
    per += 2 * (n_tokens if fused_tokens is None else fused_tokens) * feature_dim(cfg, token_bins) * enc.width
    return float(sequences * per)
