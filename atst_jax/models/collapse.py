"""Collapse of an encoder's token features: two monitors and a regulariser against it.

Frame-level teacher-student objectives (ATST-Frame's masked-token BYOL, data2vec-style regression, masked
reconstruction) all have an easy way out on clips whose content changes slowly: give every token of a clip
nearly the same vector (the clip's background, which predicts any masked span), in a handful of dimensions.
The projector's BatchNorm rescales whatever variation is left, so the loss and the usual collapse monitor
(the std of the L2-normalised *projector* outputs, ``byol.normalized_std``) look healthy while the encoder's
features, the thing a downstream probe reads, have lost what happens inside the clip. Measured on the
embedded data (BENCHMARKS.md, "The demo recipe: within-clip variance and covariance terms"): after 1,500 ATST-Frame ``tiny`` steps (the recipe's
views, peak LR 2.5e-4) the teacher's last-block tokens kept 0.8 % of their variance within clips (24.5 % at
initialisation) in 1.7 effective dimensions (3.7), and the frozen-feature SED probe fell from 0.43 frame mAP
(the same encoder at initialisation) to 0.34, while ``std_frm_tea`` stayed at 0.074 (0.070 at step 10).

Monitors, on final-normed tokens ``[B, N, D]`` with a validity mask ``[B, N]``:

* :func:`within_clip_share` — the share of the tokens' variance that lies within clips (each clip's mean
  removed) rather than between clip means: 0 when every clip is one constant vector.
* :func:`effective_dim` — the participation ratio ``(Σλ)² / Σλ²`` of the eigenvalues λ of the tokens'
  covariance: how many directions the features really use (1 = a single direction, D = isotropic). It
  needs no eigendecomposition: ``Σλ = tr C`` and ``Σλ² = ‖C‖²_F``.

Regulariser (ours: not part of any recipe in spec/methods.md; off unless a config asks for it):
:func:`spread_terms` is VICReg's variance and covariance terms (Bardes, Ponce & LeCun, ICLR 2022) taken
**within clips**: a hinge ``mean relu(target − std)`` on each dimension's standard deviation over the valid
tokens of each clip, and the squared off-diagonal covariance of the clip-centred tokens (pooled over the
batch) divided by D. The first forbids the "one vector per clip" solution, the second the collapse onto a
few directions; neither asks for anything a clip does not contain, so the BYOL term still decides what the
features mean.

All reductions over tokens are written as matrix products (as ``byol.normalized_std`` and the masked
BatchNorm), which XLA shards over the batch like the rest of the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_EPS = 1e-4  # VICReg's epsilon under the square root

# The encoder-health monitors every method reports (the method contract, ``methods/base.py``), computed by
# :func:`health` on the teacher's final-normed patch tokens, and the defaults below which the trainer's
# progress line warns (``config.train.health_min``). A tiny ATST-Frame encoder at initialisation keeps ≈ 25 %
# of its token variance within clips in ≈ 4 effective dimensions; collapsed (see above), 0.8 % in 1.7.
HEALTH_MONITORS = ("within_tea", "dim_tea")
HEALTH_MIN = {"within_tea": 0.02, "dim_tea": 2.0}


def _clip_centred(tokens, valid):
    """``(centred [B, N, D] (0 at invalid tokens), weights [B, N] float32, counts [B])``."""
    x = tokens.astype(jnp.float32)
    w = valid.astype(jnp.float32)
    counts = jnp.sum(w, axis=1)
    mean = jnp.einsum("bn,bnd->bd", w, x) / jnp.maximum(counts, 1.0)[:, None]
    return (x - mean[:, None, :]) * w[..., None], w, counts


def spread_terms(tokens, valid, target: float):
    """VICReg's variance and covariance terms within clips: ``(var_loss, cov_loss, within_std)``.

    ``var_loss`` = mean over clips with at least two valid tokens and over dimensions of
    ``relu(target − sqrt(var + 1e-4))``, the unbiased variance taken over the clip's valid tokens;
    ``cov_loss`` = ``Σ_{i≠j} C_ij² / D`` for the covariance ``C`` of the clip-centred valid tokens of the whole
    batch (``n − B`` degrees of freedom: each clip's mean was removed); ``within_std`` = the mean of those
    per-clip, per-dimension standard deviations (a monitor).
    """
    c, _, counts = _clip_centred(tokens, valid)
    d = c.shape[-1]
    var = jnp.sum(jnp.square(c), axis=1) / jnp.maximum(counts - 1.0, 1.0)[:, None]  # [B, D]
    std = jnp.sqrt(var + STD_EPS)
    clips = (counts >= 2).astype(jnp.float32)
    n_clips = jnp.maximum(jnp.sum(clips), 1.0)
    var_loss = jnp.sum(jax.nn.relu(target - std) * clips[:, None]) / (n_clips * d)
    within_std = jnp.sum(std * clips[:, None]) / (n_clips * d)
    flat = c.reshape(-1, d)
    dof = jnp.maximum(jnp.sum(counts) - jnp.sum(counts > 0), 1.0)
    cov = flat.T @ flat / dof
    off = cov - jnp.diag(jnp.diag(cov))
    cov_loss = jnp.sum(jnp.square(off)) / d
    return var_loss, cov_loss, within_std


def health(tokens, valid) -> dict:
    """``{"within_tea": within_clip_share, "dim_tea": effective_dim}`` of the teacher's final-normed patch
    tokens ``[B, N, D]`` (no CLS) with their validity ``[B, N]``; no gradient flows through either."""
    tokens = jax.lax.stop_gradient(tokens)
    return {"within_tea": within_clip_share(tokens, valid), "dim_tea": effective_dim(tokens, valid)}


def within_clip_share(tokens, valid):
    """Share of the valid tokens' variance that lies within clips: ``Σ‖x − clip mean‖² / Σ‖x − batch mean‖²``."""
    c, w, _ = _clip_centred(tokens, valid)
    x = tokens.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.einsum("bn,bnd->d", w, x) / n
    total = jnp.sum(jnp.square(x - mean) * w[..., None])
    return jnp.sum(jnp.square(c)) / jnp.maximum(total, 1e-12)


def effective_dim(tokens, valid):
    """Participation ratio ``(tr C)² / ‖C‖²_F`` of the covariance ``C`` of the valid tokens (batch mean removed)."""
    x = tokens.astype(jnp.float32).reshape(-1, tokens.shape[-1])
    w = valid.astype(jnp.float32).reshape(-1)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = (w @ x) / n
    xc = (x - mean) * w[:, None]
    cov = xc.T @ xc / n
    return jnp.square(jnp.trace(cov)) / jnp.maximum(jnp.sum(jnp.square(cov)), 1e-24)
