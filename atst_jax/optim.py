"""Optimiser and schedules of the official ATST recipes.

The official code uses ``transformers.AdamW`` (β 0.9/0.999, eps 1e-6, bias correction on) with two parameter
groups and per-step schedules taken from NumPy arrays (``cosine_scheduler_step``). Two details differ from
``optax.adamw`` and are reproduced here:

- eps is added to ``sqrt(v)`` *before* bias correction is folded into the step size
  (``p -= lr·sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps)``), which matters in the first steps;
- decoupled weight decay is applied *after* the Adam update, to the updated parameter
  (``p ← p' − lr·wd·p'``).

Weight decay applies to every parameter that is not a bias and has ≥ 2 dimensions (``pos_embed`` and
``mask_embed`` included); 1-D tensors and biases get none.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


# --- schedules (match audiossl.utils.common.cosine_scheduler_step indexed by the step) ------------------
def warmup_cosine(step, base: float, final: float, warmup: int, total: int):
    """``linspace(0, base, warmup)`` then cosine from ``base`` to ``final`` over the remaining steps."""
    step = jnp.minimum(jnp.asarray(step, jnp.float32), total - 1)
    warm = base * step / max(warmup - 1, 1) if warmup > 0 else jnp.asarray(base, jnp.float32)
    i = step - warmup
    cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * i / max(total - warmup, 1)))
    return jnp.where(step < warmup, warm, cos)


def cosine(step, start: float, end: float, total: int):
    """Cosine from ``start`` (step 0) towards ``end`` (reached at step ``total``)."""
    step = jnp.minimum(jnp.asarray(step, jnp.float32), total - 1)
    return end + 0.5 * (start - end) * (1 + jnp.cos(jnp.pi * step / total))


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule of the recipes: ``base_lr × global_batch / 256``."""
    return base_lr * global_batch / 256.0


# --- parameter groups -----------------------------------------------------------------------------------
def decay_mask(params: nnx.State):
    """Per-variable bool (same tree structure as ``params``): True where weight decay applies — not a bias
    and ≥ 2-D before stacking (scanned layers add a leading dim, so the logical ``axes`` give the true rank)."""

    def one(path, v):
        name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
        axes = v.get_metadata().get("axes", None)
        ndim = len(axes) if axes is not None else np.ndim(v.get_value())
        return v.replace(name != "bias" and ndim >= 2)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --- AdamW, transformers and torch flavours ------------------------------------------------------------
class HFAdamWState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


GRAD_CLIPS = ("none", "global_norm", "per_param")


def layer_dims(params):
    """Per variable (same tree structure as ``params``): how many leading dimensions stack separate layers —
    1 for the blocks' parameters, which ``nnx.vmap`` stacks on a ``[L, …]`` axis that their logical ``axes``
    do not name, else 0. Leaves without ``axes`` metadata (plain arrays) count as unstacked."""

    def one(v):
        if not isinstance(v, nnx.Variable):
            return 0
        axes = v.get_metadata().get("axes", None)
        return v.replace(0 if axes is None else max(np.ndim(v.get_value()) - len(axes), 0))

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def clip_gradients(grads, mode: str, max_norm: float, layers=None):
    """Gradient clipping as the official PyTorch recipes do it, before the optimizer:

    - ``global_norm``: ``torch.nn.utils.clip_grad_norm_`` — all gradients scaled by
      ``min(1, max_norm / (‖g‖ + 1e-6))`` over the whole tree;
    - ``per_param``: DINO/ASiT ``clip_gradients`` — each PyTorch parameter's gradient scaled by
      ``min(1, max_norm / (‖g_p‖ + 1e-6))`` on its own. A PyTorch model holds one tensor per layer where we
      stack the layers on a leading axis, so ``layers`` (``layer_dims`` of the params, same structure as
      ``grads``) names the stacked leaves, and each layer slice of those gets its own norm and factor;
    - ``none``: unchanged.
    """
    if mode == "none":
        return grads
    if mode == "global_norm":
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    if mode == "per_param":

        def clip(g, lead):
            sq = jnp.square(g.astype(jnp.float32))
            norm = jnp.sqrt(jnp.sum(sq, axis=tuple(range(lead, g.ndim)), keepdims=True))
            return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

        if layers is None:
            return jax.tree.map(lambda g: clip(g, 0), grads)
        return jax.tree.map(clip, grads, layers)
    raise ValueError(f"grad_clip must be one of {GRAD_CLIPS}, got {mode!r}")


ADAMW_FLAVOURS = ("transformers", "torch", "fairseq")


def hf_adamw(
    lr_fn,
    wd_fn,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    mask=None,
    grad_clip="none",
    clip_norm=0.0,
    flavour="transformers",
) -> optax.GradientTransformation:
    """AdamW as ``transformers.AdamW(correct_bias=True)`` (``flavour="transformers"``, the ATST recipes) or as
    ``torch.optim.AdamW`` (``flavour="torch"``, the DINO/ASiT recipes) or as fairseq's ``adam`` with weight
    decay (``flavour="fairseq"``, EAT / data2vec 2.0, the AaSP anchor); ``lr_fn``/``wd_fn`` map the step index
    to a value.

    The two differ in where eps and the decay sit: transformers adds eps to ``sqrt(v)`` before the bias
    correction is folded into the step size and decays the *updated* parameter; torch adds eps to the
    bias-corrected ``sqrt(v̂)`` and decays the parameter *before* the Adam step (``p ← p·(1 − lr·wd)``, then
    ``p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)``). fairseq takes one from each: eps before the
    bias correction as transformers, the decay on the parameter before the step as torch. ``mask`` is a pytree
    of bools (same structure
    as params) selecting the weight-decayed group; gradients are clipped first (``clip_gradients``, per layer
    of stacked parameters as ``layer_dims`` of ``params`` says) when ``grad_clip`` is not ``none``. The state
    layout is the same for both flavours.
    """
    if flavour not in ADAMW_FLAVOURS:
        raise ValueError(f"AdamW flavour must be one of {ADAMW_FLAVOURS}, got {flavour!r}")

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return HFAdamWState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def update(grads, state, params):
        if params is None:
            raise ValueError("hf_adamw needs params (decoupled weight decay)")
        grads = clip_gradients(grads, grad_clip, clip_norm, layers=layer_dims(params))
        t = state.count + 1
        lr, wd = lr_fn(state.count), wd_fn(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, grads)
        tf = t.astype(jnp.float32)
        decay = mask if mask is not None else jax.tree.map(lambda _: True, params)
        if flavour == "torch":
            bc1, bc2_sqrt = 1 - b1**tf, jnp.sqrt(1 - b2**tf)
            adam = jax.tree.map(lambda m, v: -(lr / bc1) * m / (jnp.sqrt(v) / bc2_sqrt + eps), mu, nu)
            # p_new = p·(1 − lr·wd) + u  ⇔  update = u − lr·wd·p
            updates = jax.tree.map(lambda u, p, d: (u - lr * wd * p) if d else u, adam, params, decay)
            return updates, HFAdamWState(t, mu, nu)
        step_size = lr * jnp.sqrt(1 - b2**tf) / (1 - b1**tf)
        adam = jax.tree.map(lambda m, v: -step_size * m / (jnp.sqrt(v) + eps), mu, nu)

        def with_decay(u, p, d):
            if not d:
                return u
            if flavour == "fairseq":
                # p_new = p·(1 − lr·wd) + u  ⇔  update = u − lr·wd·p
                return u - lr * wd * p
            # p_new = (p + u) * (1 - lr·wd)  ⇔  update = u − lr·wd·(p + u)
            return u - lr * wd * (p + u)

        updates = jax.tree.map(with_decay, adam, params, decay)
        return updates, HFAdamWState(t, mu, nu)

    return optax.GradientTransformation(init, update)


def ema_momentum(step, base: float, total: int):
    """Teacher momentum: cosine from ``base`` at step 0 to 1.0 at the end (``cosine_scheduler_step(ema, 1)``)."""
    return cosine(step, base, 1.0, total)


WD_SCHEDULES = ("cosine", "constant")


def weight_decay_schedule(optim_config, total: int):
    """Step → weight decay: ``cosine`` from ``wd_start`` to ``wd_end`` (the ATST/DINO recipes) or ``constant``
    at ``wd_start`` (EAT-style recipes)."""
    o = optim_config
    kind = o.get("wd_schedule", "cosine")
    if kind == "constant":
        return lambda s: jnp.asarray(o.wd_start, jnp.float32)
    return lambda s: cosine(s, o.wd_start, o.wd_end, total)


def make_optimizer(optim_config, lr_fn, wd_fn, mask) -> optax.GradientTransformation:
    """The shared AdamW with the run's knobs (betas, eps, clipping) from ``config.optim``."""
    o = optim_config
    return hf_adamw(
        lr_fn,
        wd_fn,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        mask=mask,
        grad_clip=o.get("grad_clip", "none"),
        clip_norm=float(o.get("clip_norm", 0.0)),
        flavour=o.get("adamw", "transformers"),
    )


def check_config(optim_config) -> None:
    """One-line ``ConfigError``s for the optimizer knobs, before anything is compiled."""
    from atst_jax.sharding import ConfigError

    o = optim_config
    clip = o.get("grad_clip", "none")
    if clip not in GRAD_CLIPS:
        raise ConfigError(f"optim.grad_clip={clip!r}: choose one of {', '.join(GRAD_CLIPS)}")
    if clip != "none" and not float(o.get("clip_norm", 0.0)) > 0:
        raise ConfigError(f"optim.grad_clip={clip} needs optim.clip_norm > 0")
    flavour = o.get("adamw", "transformers")
    if flavour not in ADAMW_FLAVOURS:
        raise ConfigError(f"optim.adamw={flavour!r}: choose one of {', '.join(ADAMW_FLAVOURS)}")
    wd = o.get("wd_schedule", "cosine")
    if wd not in WD_SCHEDULES:
        raise ConfigError(f"optim.wd_schedule={wd!r}: choose one of {', '.join(WD_SCHEDULES)}")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError(f"optim.b1={o.b1}, optim.b2={o.b2}: betas must be in [0, 1)")
