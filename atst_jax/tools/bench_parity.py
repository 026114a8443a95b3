"""One train step of ours against one step of the official PyTorch code, same weights and inputs (float32).

    python -m atst_jax.bench parity --official PATH --config configs/atst_frame.py:small --batch 4 \\
        --config.model.depth=2 --config.atst_frame.crop_seconds=1.0 [--step N] [--seed S] [--json OUT]
    python -m atst_jax.bench parity --official PATH --config configs/asit.py:tiny --batch 4 \\
        --config.model.depth=2 --config.asit.crop_frames=64

``PATH`` is the user's checkout of the official code: github.com/Audio-WestlakeU/audiossl for ATST-Frame
(its modules are imported through ``atst_jax.tools.bench_official.load_official``), github.com/Sara-Ahmed/ASiT for
ASiT (``vision_transformer.py``, ``losses.py``, ``utils.py`` and ``FullPipeline`` of ``main_ASiT.py``).
Nothing of either is part of this project. Keep the model small (``:tiny`` or ``:small`` at
``--config.model.depth=2``, short crops): the official side runs on the CPU.

Both sides get the same weights: a random student and an independent random teacher drawn in our parameter
tree (LayerNorm / BatchNorm scales ``1 + 0.1·N`` and biases ``0.1·N``, random BatchNorm statistics and DINO
centres, so a swapped weight / bias, a transpose or a student / teacher mix-up changes numbers), exported
into the official modules' names and loaded strictly. The Adam moments are random too (``count = --step``,
``m`` and ``v`` at each tensor's gradient scale), so bias correction, eps and decay all enter. Both get the
same batch (random log-mels in [-1, 1]; ATST-Frame rows of uneven length, exercising the padding masks) and
the same random draws: ours are taken by our method and injected into theirs, recorded where the method
calls them (``views.span_mask`` for ATST-Frame's span mask, shared by both views; ``views.gmml_corrupt`` for
ASiT's corrupted crops and corruption masks, which the official code draws in its data loader). Views are
the identity on both sides (ATST-Frame ``aug_view1 = aug_view2 = False``: no mixup, no frequency warp).
Drop-path is 0 on both sides; JAX matmuls run at ``highest`` precision.

One step on each: loss, backward, optimizer step at ``--step`` (default: the end of the warm-up, where the LR
peaks) with each side's own schedules, EMA of the teacher. Ours is ``Trainer._loss_and_grads`` (the method's
loss under ``jax.value_and_grad``) then the optimizer / EMA part of ``Trainer.train_step`` (``tx.update``,
``optax.apply_updates``, ``ema_update`` at ``ema_fn(step)``). Theirs:

- ATST-Frame: ``FrameATST(arch=…)`` (student and teacher ``MultiCropWrapper``, ``ByolLoss``) forward and
  backward on ``[view 1, view 2]`` with the shared mask, AdamW over ``utils.common.get_params_groups(student)``
  (group 0 decayed) at ``cosine_scheduler_step``'s LR / weight decay, ``update_teacher`` at its EMA momentum.
- ASiT: ``FullPipeline(VisionTransformer, CLSHead, RECHead)`` student and teacher, ``CLSLoss`` /
  ``DATALoss`` (centres updated by the forward), the reconstruction L1 over corrupted pixels and
  ``L = L_cls + L_data + 2·L_rec`` as ``train_one_epoch`` writes them, ``utils.clip_gradients`` (each
  tensor clipped on its own), ``cancel_gradients_last_layer``, ``torch.optim.AdamW`` over
  ``utils.get_params_groups`` at ``utils.cosine_scheduler``'s values, the EMA loop over all parameters.

Compared, and the tolerances the exit status is held to (0: all within, 1: something outside, 2: a user
error, one line):

- the loss and its parts / monitors: absolute ``1e-5``;
- every student gradient (before clipping): ``‖g_ours − g_theirs‖ / ‖g_theirs‖ < 1e-4`` per tensor; a
  tensor whose gradient is below ``1e-6`` of the total gradient norm on both sides (zero in exact
  arithmetic, e.g. the final norm's bias under ATST's train-mode BatchNorm) counts as zero;
- every student parameter after the optimizer step, the EMA'd teacher, ATST's BatchNorm running statistics
  and ASiT's updated centres: relative ``1e-5`` per tensor;
- the schedules at the step (LR, weight decay, EMA momentum, ASiT's τ_t): relative ``1e-6``.

The table prints, per tensor group, the worst of each with the tensor it came from, and how far the step
moved the parameters (a step that moves nothing could not show an optimizer difference). Relative update
differences ``‖Δ_ours − Δ_theirs‖ / ‖Δ_theirs‖`` are printed for information: float32 rounding of the
parameters themselves (``Δ`` is ~1e-3 of them) puts them near 1e-4.

Stand-ins for pieces that need CUDA, a process group or packages outside PyTorch (listed in the output):

- ATST-Frame: ``pytorch_lightning``, ``transformers.optimization``, ``fairseq.data.data_utils`` stubbed by
  ``bench_official``; ``byol.compute_var`` (CUDA counter + all-reduce) computed on one process; the optimizer
  is ``transformers.optimization.AdamW`` when ``transformers`` has it, otherwise its update rule restated in
  PyTorch (eps added to ``sqrt(v)`` before the bias correction is folded into the step size, decoupled decay
  of the updated parameter). ``FrameAST_small`` / ``_base`` fix 12 blocks of 384 / 768 and
  ``MultiCropWrapper`` fixes 4096 → 256 heads: their calls reach ``FrameAST`` / ``build_mlp`` with the config's
  width, depth, heads, head sizes and positions substituted (every other argument — LayerNorm eps, qkv bias,
  the BatchNorm layout — is theirs); ``drop_path_rate=0``.
- ASiT: ``losses.dist`` (``all_reduce`` / ``get_world_size`` of the centre update) on one process;
  ``torchvision``, ``dataloader`` and ``data_transformations`` (data-side imports of ``main_ASiT.py``)
  stubbed; ``vit_small`` / ``vit_base`` reach ``VisionTransformer`` with the config's width, depth and heads;
  the heads are built with the config's sizes through their constructors' own arguments; no DDP, no AMP
  (``fp16_scaler`` off: float32), ``.cuda()`` left out. The official ViT adds its whole ``pos_embed``, so it
  is built for the crop (``audio_size = [crop_frames, n_mels]``) and gets the first ``N + 1`` of our slots;
  the unused ones and our ``mask_embed`` (which the ViT lacks) are not compared. The official teacher also
  carries a reconstruction head that is averaged but never used; ours has none: not compared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from atst_jax.errors import UserError

LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4
PARAM_RTOL = 1e-5
SCHED_RTOL = 1e-6
ZERO_GRAD = 1e-6  # a gradient below this fraction of the total norm on both sides counts as zero
ASIT_FILES = ("vision_transformer.py", "losses.py", "utils.py", "main_ASiT.py")


class ParityError(UserError):
    """A bad argument or an unsupported configuration: one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------


def rel_err(ours, theirs) -> float:
    """``‖ours − theirs‖ / ‖theirs‖`` in float64 (0 when both are zero)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    den = np.linalg.norm(theirs)
    num = np.linalg.norm(ours - theirs)
    return float(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64)))


def random_tree(abstract, rng):
    """Plain nested dict of random float32 arrays shaped like ``abstract`` (a pure tree of shapes).

    LayerNorm / BatchNorm scales ``1 + 0.1·N``, biases ``0.1·N``, the encoder's matrices and embeddings
    ``0.02·N`` (its init scale), the heads' ``N / sqrt(fan_in)``; BatchNorm running mean ``0.1·N``, running
    variance in [0.5, 1.5], ``num_batches_tracked`` 5."""
    import jax

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "num_batches_tracked":
            return np.full(shape, 5, np.int32)
        if name == "running_var":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "running_mean":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name == "scale":
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            x = 0.1 * rng.standard_normal(shape)
        elif str(getattr(path[0], "key", path[0])) == "encoder":
            x = 0.02 * rng.standard_normal(shape)
        else:  # head kernels [in, out]
            x = rng.standard_normal(shape) / np.sqrt(shape[0])
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@contextlib.contextmanager
def patched(obj, name, value):
    """``setattr(obj, name, value)`` for the duration of the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def recording(fn, sink: list):
    """``fn`` that also appends the NumPy values of its outputs to ``sink`` when they are computed (inside
    ``jit`` too): how our method's random draws are taken for the official side."""
    import jax

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        leaves = jax.tree.leaves(out)
        jax.debug.callback(lambda *xs: sink.append([np.array(x) for x in xs]), *leaves)
        return out

    return wrapper


# ----------------------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------------------


def our_config(config_spec: str, batch: int, sets):
    """The config at ``batch`` with the overrides, drop-path 0, float32 (identity views for ATST-Frame)."""
    from atst_jax.tools.bench_step import make_config

    config = make_config(config_spec, batch, sets)
    official = official_of(config.method, f"--config {config_spec}")
    config.model.update(drop_path=0.0, dtype="float32")
    config[config.method].update(official.our_settings)
    return config


def our_trainer(config):
    """``Trainer`` of ``config`` on one device."""
    import jax

    from atst_jax import sharding as shd
    from atst_jax.trainer import Trainer

    return Trainer(config, shd.make_mesh({"data": 1}, jax.devices()[:1]))


def our_step(trainer, host, step: int, seed: int, draw_names):
    """Random state, our loss / gradients (recording the method's draws), then optimizer and EMA.

    Returns a dict of plain NumPy trees: ``before`` (params, stats, teacher, tstats, method, opt), ``loss``,
    ``metrics``, ``grads``, ``after`` (params, teacher, stats, tstats, method), ``draws`` (per name, the
    arrays of the first call) and the schedule values at ``step``."""
    import jax
    import jax.numpy as jnp
    import optax

    from atst_jax.checkpoint import from_pure, to_pure
    from atst_jax.data import views
    from atst_jax.optim import HFAdamWState
    from atst_jax.trainer import ema_update

    rng = np.random.default_rng(seed)
    abstract = trainer.abstract_state
    pure = {k: to_pure(abstract[k]) for k in ("params", "stats", "teacher", "teacher_stats")}
    before = {k: random_tree(v, rng) for k, v in pure.items()}
    before["method"] = {
        k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in abstract["method"].items()
    }
    live = {k: from_pure(abstract[k], before[k]) for k in pure}

    sinks = {name: [] for name in draw_names}
    with contextlib.ExitStack() as stack:
        for name in draw_names:
            stack.enter_context(patched(views, name, recording(getattr(views, name), sinks[name])))
        fn = jax.jit(trainer._loss_and_grads)
        (loss, (metrics, new_stats, new_tstats, new_mstate)), grads = jax.device_get(
            fn(
                live["params"],
                live["stats"],
                live["teacher"],
                live["teacher_stats"],
                {k: jnp.asarray(v) for k, v in before["method"].items()},
                host,
                jax.random.key(seed),
                np.int32(step),
            )
        )
    draws = {}
    for name, calls in sinks.items():
        if not calls:
            raise RuntimeError(f"our method did not call views.{name}; the bench cannot inject its draws")
        draws[name] = calls[0]

    # Adam moments at each tensor's gradient scale (floored at 1e-3 of the mean scale, so a gradient that is
    # zero in exact arithmetic gets moments well above its rounding noise).
    g_pure = to_pure(grads)
    leaves = jax.tree.leaves(g_pure)
    mean_rms = np.sqrt(sum(float(np.sum(np.square(g))) for g in leaves) / sum(g.size for g in leaves))
    scale = jax.tree.map(lambda g: max(float(np.sqrt(np.mean(np.square(g)))), 1e-3 * mean_rms), g_pure)
    mu = jax.tree.map(lambda g, s: (s * rng.standard_normal(g.shape)).astype(np.float32), g_pure, scale)
    nu = jax.tree.map(lambda g, s: (s * s * rng.uniform(0.5, 2.0, g.shape)).astype(np.float32), g_pure, scale)
    opt = HFAdamWState(
        jnp.asarray(step, jnp.int32), from_pure(abstract["params"], mu), from_pure(abstract["params"], nu)
    )
    before["opt"] = {"count": step, "mu": mu, "nu": nu}

    def update(grads, opt, params, teacher):  # the optimizer and EMA part of Trainer.train_step
        updates, _ = trainer.tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        momentum = trainer.ema_fn(step)
        return params, ema_update(teacher, params, momentum, trainer.method.ema_covers)

    params, teacher = jax.device_get(
        jax.jit(update)(from_pure(abstract["params"], g_pure), opt, live["params"], live["teacher"])
    )
    return {
        "before": before,
        "loss": float(loss),
        "metrics": {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0},
        "grads": g_pure,
        "after": {
            "params": to_pure(params),
            "teacher": to_pure(teacher),
            "stats": to_pure(new_stats),
            "teacher_stats": to_pure(new_tstats),
            "method": {k: np.asarray(v) for k, v in new_mstate.items()},
        },
        "draws": draws,
        "schedule": {
            "lr": float(trainer.lr_fn(step)),
            "wd": float(trainer.wd_fn(step)),
            "ema": float(trainer.ema_fn(step)),
        },
    }


# ----------------------------------------------------------------------------------------------------------
# The official side: common pieces
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Theirs:
    """What the official step produced, in their names: loss (and parts), raw gradients, the student and
    teacher after the step, buffers / states, schedule values, stand-ins."""

    loss: float
    parts: dict
    grads: dict
    params_before: dict
    params_after: dict
    teacher_after: dict
    buffers: dict
    schedule: dict
    stand_ins: list


def _set_adam_state(torch, opt, named, mu, nu, step: int, flavour: str):
    """Our Adam moments (exported to their names) into a PyTorch optimizer's state."""
    for name, p in named.items():
        state = {
            "exp_avg": torch.tensor(np.asarray(mu[name]), dtype=p.dtype),
            "exp_avg_sq": torch.tensor(np.asarray(nu[name]), dtype=p.dtype),
        }
        state["step"] = torch.tensor(float(step)) if flavour == "torch" else step
        opt.state[p] = state


def _transformers_adamw(torch):
    """``transformers.optimization.AdamW`` if the installed ``transformers`` has it, else its update rule
    restated: ``(optimizer class, which)``."""
    saved = sys.modules.get("transformers")
    try:
        if saved is None and importlib.util.find_spec("transformers") is not None:
            from transformers.optimization import AdamW

            return AdamW, "transformers.optimization.AdamW (installed)"
    except Exception:  # noqa: BLE001 -- removed in recent releases, or an import failure: use the restatement
        pass

    class TransformersAdamW(torch.optim.Optimizer):
        """The update of ``transformers.AdamW(correct_bias=True)``: Adam moments, eps added to ``sqrt(v)``,
        step size ``lr·sqrt(1 − β2^t)/(1 − β1^t)``, then ``p ← p − lr·wd·p`` on the updated parameter."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                b1, b2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                    m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
                    v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
                    size = group["lr"] * (1.0 - b2**t) ** 0.5 / (1.0 - b1**t)
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)
                    if group["weight_decay"] > 0.0:
                        p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    return (
        TransformersAdamW,
        "transformers AdamW update rule restated in PyTorch (transformers not installed)",
    )


def _numpy(named) -> dict:
    return {k: v.detach().numpy().copy() for k, v in named.items()}


# ----------------------------------------------------------------------------------------------------------
# ATST-Frame
# ----------------------------------------------------------------------------------------------------------


def atst_frame_export(tree, stats) -> dict:
    """Student / teacher param-shaped tree (params, gradients, moments) → the official names."""
    from atst_jax.export import convert

    return convert.network_to_torch(tree, stats)


def atst_frame_official(path: str, trainer, ours: dict, host: dict, step: int) -> Theirs:
    import torch

    from atst_jax.tools import bench_official

    adamw, which = _transformers_adamw(torch)  # before load_official stubs transformers
    model_mod, byol, common, stubs = bench_official.load_official(path)
    audio_transformer = sys.modules[model_mod.FrameAST_small.__module__]
    cfg, enc = trainer.method.cfg, trainer.enc_cfg
    config = trainer.config
    stand_ins = [f"stubbed module {s}" for s in stubs]
    official_width = {"small": 384, "base": 768}
    arch = "base" if enc.width == 768 else "small"
    frame_ast = audio_transformer.FrameAST

    def sized_frame_ast(**kw):  # FrameAST_small/_base's call, at the config's sizes
        kw.update(embed_dim=enc.width, depth=enc.depth, num_heads=enc.heads, drop_path_rate=0.0)
        return frame_ast(**kw)

    build_mlp = byol.build_mlp

    def sized_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        # MultiCropWrapper: projector build_mlp(2, embed_dim, 4096, 256), predictor build_mlp(2, 256, 4096, 256)
        d_in = enc.width if input_dim == official_width[arch] else cfg.proj_dim
        return build_mlp(num_layers, d_in, cfg.proj_hidden, cfg.proj_dim, last_bn=last_bn)

    n_mels, patch_w = int(enc.n_mels), int(enc.patch_w)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(byol, "compute_var", bench_official._single_process_var(torch)))
        stack.enter_context(patched(audio_transformer, "FrameAST", sized_frame_ast))
        stack.enter_context(patched(byol, "build_mlp", sized_mlp))
        net = model_mod.FrameATST(
            arch=arch,
            symmetric=bool(cfg.symmetric),
            pos_type="cut",
            avg_blocks=0,
            patch_embed="Linear",
            spec_h=n_mels,
            spec_w=(int(enc.num_pos) - 1) * patch_w,  # pos_embed of num_pos slots, as ours
            patch_h=n_mels,
            patch_w=patch_w,
            n_mels=n_mels,
            drop_path_rate=0.0,
        )
        stand_ins += [
            "byol.compute_var on one process (no CUDA counter, no all-reduce)",
            f"FrameAST_{arch} -> FrameAST(embed_dim={enc.width}, depth={enc.depth}, num_heads={enc.heads}, "
            "drop_path_rate=0)",
            f"MultiCropWrapper heads -> build_mlp(hidden {cfg.proj_hidden}, out {cfg.proj_dim})",
        ]
        net.train()
        b = ours["before"]
        for part, params, stats in (
            (net.student, b["params"], b["stats"]),
            (net.teacher, b["teacher"], b["teacher_stats"]),
        ):
            sd = atst_frame_export(params, stats)
            part.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)

        mask = torch.from_numpy(ours["draws"]["span_mask"][0].astype(bool))
        spec = torch.from_numpy(host["spec"]).to(torch.get_default_dtype())[:, None]  # [B, 1, F, T]
        length = torch.from_numpy(host["spec_length"]).long()
        x, lengths, masks = [spec, spec.clone()], [length, length.clone()], [mask, mask.clone()]
        loss, std_s, std_t = net(x, lengths, masks)
        loss.backward()

    named = dict(net.student.named_parameters())
    grads = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy() for k, p in named.items()
    }
    params_before = _numpy(named)

    # FrameATSTLightningModule.__init__'s schedules: the run's peak LR, warm-up, steps and EMA base; its
    # constants (final LR 1e-6, weight decay 0.04 -> 0.4).
    total = int(config.train.steps)
    lr_s = common.cosine_scheduler_step(trainer.peak_lr, 1e-6, total, int(config.optim.warmup_steps))
    wd_s = common.cosine_scheduler_step(0.04, 0.4, total, 0)
    ema_s = common.cosine_scheduler_step(float(config.optim.ema), 1, total, 0)
    schedule = {"lr": float(lr_s[step]), "wd": float(wd_s[step]), "ema": float(ema_s[step])}

    stand_ins.append(f"optimizer: {which}")
    groups = common.get_params_groups(net.student)
    opt = adamw(groups, lr=schedule["lr"], weight_decay=0.0)  # configure_optimizers: betas / eps defaults
    for i, group in enumerate(opt.param_groups):  # FrameATSTLightningModule.schedule()
        group["lr"] = schedule["lr"]
        group["weight_decay"] = schedule["wd"] if i == 0 else 0.0
    mu = atst_frame_export(ours["before"]["opt"]["mu"], ours["before"]["stats"])
    nu = atst_frame_export(ours["before"]["opt"]["nu"], ours["before"]["stats"])
    _set_adam_state(torch, opt, named, mu, nu, step, "transformers")
    opt.step()
    net.update_teacher(schedule["ema"])

    buffers = {}
    for prefix, part in (("student", net.student), ("teacher", net.teacher)):
        for k, v in part.state_dict().items():
            if "running" in k or "num_batches" in k:
                buffers[f"{prefix}.{k}"] = v.numpy().copy()
    return Theirs(
        loss=float(loss.detach()),
        parts={"std_frm_stu": float(std_s), "std_frm_tea": float(std_t)},
        grads=grads,
        params_before=params_before,
        params_after=_numpy(named),
        teacher_after=_numpy(dict(net.teacher.named_parameters())),
        buffers=buffers,
        schedule=schedule,
        stand_ins=stand_ins,
    )


def atst_frame_compare(trainer, ours: dict, theirs: Theirs):
    """``(pairs, extra)``: tensor pairs ``{kind: {name: (ours, theirs)}}`` and scalar checks."""
    b, a = ours["before"], ours["after"]
    stats = b["stats"]
    g = atst_frame_export(ours["grads"], stats)
    p_after = atst_frame_export(a["params"], stats)
    t_after = atst_frame_export(a["teacher"], b["teacher_stats"])
    names = list(theirs.grads)
    pairs = {
        "grad": {k: (g[k], theirs.grads[k]) for k in names},
        "param": {k: (p_after[k], theirs.params_after[k]) for k in names},
        "before": {k: theirs.params_before[k] for k in names},
        "teacher": {k: (t_after[k], theirs.teacher_after[k]) for k in theirs.teacher_after},
        "teacher_before": atst_frame_export(b["teacher"], b["teacher_stats"]),
    }
    state = {}
    for prefix, tree, heads in (
        ("student", a["stats"], ("projector", "predictor")),
        ("teacher", a["teacher_stats"], ("projector",)),
    ):
        for head in heads:
            bn = tree[head]["bn"]
            for n in ("running_mean", "running_var"):
                state[f"{prefix}.{head}.1.{n}"] = (bn[n], theirs.buffers[f"{prefix}.{head}.1.{n}"])
    scalars = {k: (ours["metrics"][k], v) for k, v in theirs.parts.items()}
    counts = {
        f"{prefix}.{head}.num_batches_tracked": (
            int(tree[head]["bn"]["num_batches_tracked"]),
            int(theirs.buffers[f"{prefix}.{head}.1.num_batches_tracked"]),
        )
        for prefix, tree, heads in (
            ("student", a["stats"], ("projector", "predictor")),
            ("teacher", a["teacher_stats"], ("projector",)),
        )
        for head in heads
    }
    return pairs, state, scalars, counts


ATST_FRAME_GROUPS = (
    (r"encoder\.patch_embed\.", "patch_embed"),
    (r"encoder\.mask_embed", "mask_embed"),
    (r"encoder\.pos_embed", "pos_embed"),
    (r"encoder\.blocks\.\d+\.(norm1|attn)\.", "blocks.attn"),
    (r"encoder\.blocks\.\d+\.(norm2|mlp)\.", "blocks.mlp"),
    (r"encoder\.norm_frame\.", "final_norm"),
    (r"projector\.", "projector"),
    (r"predictor\.", "predictor"),
)


def tensor_group(name: str, groups) -> str:
    """The group of the first ``(pattern, group)`` of ``groups`` whose pattern matches the official tensor
    name at its start; ``other`` when none does."""
    return next((group for pat, group in groups if re.match(pat, name)), "other")


def atst_frame_group(name: str) -> str:
    return tensor_group(name, ATST_FRAME_GROUPS)


# ----------------------------------------------------------------------------------------------------------
# ASiT
# ----------------------------------------------------------------------------------------------------------


def load_official_asit(path: str):
    """Imports ASiT's ``vision_transformer``, ``losses``, ``utils`` and ``main_ASiT`` from the checkout at
    ``path`` (top-level modules there): ``(vits, losses, utils, main, stubs)``. Their generic names
    (``utils``, ``losses``) are taken off ``sys.modules`` again afterwards. Raises ``OfficialError``."""
    import torch  # noqa: F401  (the official modules import it)

    from atst_jax.tools.bench_official import OfficialError, _stub

    root = Path(path).expanduser().resolve()
    missing = [f for f in ASIT_FILES if not (root / f).is_file()]
    if missing:
        raise OfficialError(
            f"--official {path}: not a checkout of github.com/Sara-Ahmed/ASiT (no {', '.join(missing)})"
        )
    names = ("utils", "losses", "vision_transformer", "main_ASiT", "dataloader", "data_transformations")
    names += ("torchvision",)
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    stubs = []

    def not_here(*args, **kwargs):
        raise OfficialError("a stubbed official data-side helper was called: not part of the step")

    if importlib.util.find_spec("torchvision") is None:
        _stub("torchvision", utils=types.SimpleNamespace(save_image=not_here))
        stubs.append("torchvision")
    _stub("dataloader", AudioDataset=not_here)
    _stub("data_transformations", DataAugmentation=not_here)
    stubs += ["dataloader", "data_transformations"]
    sys.path.insert(0, str(root))
    try:
        main = importlib.import_module("main_ASiT")
        mods = [sys.modules[n] for n in ("vision_transformer", "losses", "utils")]
    except ImportError as e:
        raise OfficialError(
            f"--official {path}: importing the official ASiT code failed: {e} (it needs torch and einops)"
        ) from None
    except Exception as e:  # noqa: BLE001 -- any failure of foreign code at import: one line
        raise OfficialError(f"--official {path}: importing ASiT failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(root))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    vits, losses, utils = mods
    for mod, attr in (
        (vits, "VisionTransformer"),
        (vits, "CLSHead"),
        (vits, "RECHead"),
        (main, "FullPipeline"),
    ):
        if not hasattr(mod, attr):
            raise OfficialError(f"--official {path}: {mod.__name__} has no {attr}; an unexpected version")
    for attr in ("clip_gradients", "get_params_groups", "cosine_scheduler"):
        if not hasattr(utils, attr):
            raise OfficialError(f"--official {path}: utils.py has no {attr}; an unexpected version")
    return vits, losses, utils, main, stubs


def asit_export(tree, n_pos: int | None = None, patch_size=(16, 16)) -> dict:
    """Our ASiT student / teacher param-shaped tree → ``FullPipeline`` names (``backbone.*``, ``head_cls.*``,
    ``head_recons.*``). ``n_pos`` keeps the first slots of ``pos_embed``; ``mask_embed`` is dropped."""
    from atst_jax.export import convert

    t = convert._t
    enc = dict(tree["encoder"])
    out = {f"backbone.{k}": v for k, v in convert.vit_to_torch(enc, patch_size).items()}
    if n_pos is not None:
        out["backbone.pos_embed"] = out["backbone.pos_embed"][:, :n_pos]
    h = tree["head"]
    for i, fc in enumerate(("fc1", "fc2", "fc3")):
        out[f"head_cls.mlp.{2 * i}.weight"] = t(h[fc]["kernel"])
        out[f"head_cls.mlp.{2 * i}.bias"] = h[fc]["bias"]
    for layer in ("cls_layer", "data_layer"):
        v = h[layer]["kernel"]  # [bottleneck, prototypes]: columns normalised
        out[f"head_cls.{layer}.weight_g"] = np.ones((v.shape[1], 1), np.float32)
        out[f"head_cls.{layer}.weight_v"] = t(v)
    r = tree.get("rec_head")
    if r is not None:
        for i, fc in enumerate(("fc1", "fc2", "fc3")):
            out[f"head_recons.mlp.{2 * i}.weight"] = t(r[fc]["kernel"])
            out[f"head_recons.mlp.{2 * i}.bias"] = r[fc]["bias"]
        k = r["deconv_kernel"]  # [bottleneck, p_t·p_f], feature dt·p_f + df
        out["head_recons.convTrans.weight"] = k.reshape(k.shape[0], 1, *patch_size)
        out["head_recons.convTrans.bias"] = r["deconv_bias"]
    return out


def asit_official(path: str, trainer, ours: dict, host: dict, step: int) -> Theirs:
    import torch
    import torch.nn.functional as F

    crops = [c.name for c in trainer.method.inputs()]  # the contract's crops, in ASiT's order

    vits, losses, utils, main, stubs = load_official_asit(path)
    cfg, enc, config = trainer.method.cfg, trainer.enc_cfg, trainer.config
    p_t, p_f = (int(x) for x in enc.patch_size)
    if p_t != p_f:
        raise ParityError(
            f"model.patch_size={tuple(enc.patch_size)}: the official RECHead takes square patches"
        )
    frames, n_mels = int(cfg.crop_frames), int(enc.n_mels)
    if frames % p_t:
        raise ParityError(
            f"asit.crop_frames={frames} is not a multiple of the patch ({p_t}): the official ViT"
        )
    n_pos = (frames // p_t) * (n_mels // p_f) + 1
    stand_ins = [f"stubbed module {s}" for s in stubs]
    arch = "vit_base" if enc.width == 768 else "vit_small"
    vit_cls = vits.VisionTransformer

    def sized_vit(**kw):  # vit_small / vit_base's call, at the config's sizes
        kw.update(embed_dim=enc.width, depth=enc.depth, num_heads=enc.heads)
        return vit_cls(**kw)

    def pipeline(drop_path):
        backbone = getattr(vits, arch)(
            patch_size=[p_t, p_f], audio_size=[frames, n_mels], in_chans=1, drop_path_rate=drop_path
        )
        head = vits.CLSHead(
            enc.width,
            cfg.cls_prototypes,
            cfg.data_prototypes,
            hidden_dim=cfg.head_hidden,
            bottleneck_dim=cfg.head_bottleneck,
        )
        rec = vits.RECHead(
            enc.width,
            [frames, n_mels],
            hidden_dim=cfg.rec_hidden,
            bottleneck_dim=cfg.rec_bottleneck,
            in_chans=1,
            patch_size=p_t,
        )
        return main.FullPipeline(backbone, head, rec)

    import warnings

    single = types.SimpleNamespace(all_reduce=lambda t, *a, **k: None, get_world_size=lambda: 1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(vits, "VisionTransformer", sized_vit))
        stack.enter_context(patched(losses, "dist", single))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm's deprecation
        student, teacher = pipeline(0.0), pipeline(0.0)
        stand_ins += [
            "losses.dist: all_reduce / get_world_size on one process",
            f"{arch} -> VisionTransformer(embed_dim={enc.width}, depth={enc.depth}, num_heads={enc.heads}), "
            f"audio_size=[{frames}, {n_mels}], drop_path_rate=0",
            f"CLSHead(hidden {cfg.head_hidden}, bottleneck {cfg.head_bottleneck}, {cfg.cls_prototypes} / "
            f"{cfg.data_prototypes} prototypes), RECHead(hidden {cfg.rec_hidden}, bottleneck "
            f"{cfg.rec_bottleneck})",
            "no DDP, no AMP (fp16_scaler None), CPU tensors",
        ]
        b = ours["before"]
        sd_s = asit_export(b["params"], n_pos, (p_t, p_f))
        sd_t = asit_export(dict(b["teacher"], rec_head=b["params"]["rec_head"]), n_pos, (p_t, p_f))
        for net, sd in ((student, sd_s), (teacher, sd_t)):
            net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
        for p in teacher.parameters():
            p.requires_grad = False
        student.train(), teacher.train()

        # main_ASiT's defaults for the recipe's constants; the run's own LR peak, lengths and EMA base.
        defaults = main.get_args_parser().parse_args([])
        total = int(config.train.steps)
        w = int(cfg.teacher_temp_warmup_steps)
        # The τ_t schedule is per epoch in the official code; here one "epoch" is one step.
        temps = (float(defaults.warmup_teacher_temp), float(defaults.teacher_temp), w, total)
        temp_kw = dict(student_temp=float(cfg.student_temp), center_momentum=float(cfg.centre_momentum))
        loss_cls = losses.CLSLoss(cfg.cls_prototypes, *temps, **temp_kw)
        loss_data = losses.DATALoss(cfg.data_prototypes, *temps, **temp_kw)
        dtype = torch.get_default_dtype()
        loss_cls.center = torch.tensor(b["method"]["centre_cls"], dtype=dtype)[None]
        loss_data.center = torch.tensor(b["method"]["centre_data"], dtype=dtype)[None]

        def to_theirs(x):  # ours [B, F, T] → [B, 1, T, F] (audio_size = [frames, mel bins])
            return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2))).to(dtype)[:, None]

        bsz = host[crops[0]].shape[0]
        corrupted, masks = ours["draws"]["gmml_corrupt"]
        clean_crops = [to_theirs(host[n]) for n in crops]
        corrupted_crops = [to_theirs(corrupted[i * bsz : (i + 1) * bsz]) for i in range(2)]
        masks_crops = [to_theirs(masks[i * bsz : (i + 1) * bsz].astype(np.float32)) for i in range(2)]
        # train_one_epoch's step body (fp32, one process)
        t_cls, t_data, _ = teacher(clean_crops, recons=False)
        s_cls, s_data, s_recons = student(corrupted_crops)
        clsloss = loss_cls(s_cls, t_cls, step)
        dtaloss = loss_data(s_data, t_data, step)
        rloss = F.l1_loss(s_recons, torch.cat(clean_crops[:2]), reduction="none")
        recloss = rloss[torch.cat(masks_crops[:2]) == 1].mean()
        loss = clsloss + dtaloss + 2 * recloss
        loss.backward()

    named = {k: p for k, p in student.named_parameters() if p.requires_grad}
    grads = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy() for k, p in named.items()
    }
    params_before = _numpy(named)

    # train_ASiT's schedules with one "epoch" of one step.
    warmup = int(config.optim.warmup_steps)
    lr_s = utils.cosine_scheduler(trainer.peak_lr, float(defaults.min_lr), total, 1, warmup_epochs=warmup)
    wd_s = utils.cosine_scheduler(float(defaults.weight_decay), float(defaults.weight_decay_end), total, 1)
    ema_s = utils.cosine_scheduler(float(config.optim.ema), 1, total, 1)
    schedule = {
        "lr": float(lr_s[step]),
        "wd": float(wd_s[step]),
        "ema": float(ema_s[step]),
        "teacher_temp": float(loss_cls.teacher_temp_schedule[step]),
    }
    clip = float(defaults.clip_grad)
    grad_norms = utils.clip_gradients(student, clip)  # args.clip_grad: each tensor on its own
    clipped = sum(n > clip for n in grad_norms)
    stand_ins.append(
        f"(note) utils.clip_gradients at {clip:g} clipped {clipped} of {len(grad_norms)} tensors"
    )
    utils.cancel_gradients_last_layer(0, student, 1)  # no parameter is named last_layer: a no-op
    opt = torch.optim.AdamW(utils.get_params_groups(student))  # train_ASiT: betas / eps defaults
    for i, group in enumerate(opt.param_groups):
        group["lr"] = schedule["lr"]
        if i == 0:
            group["weight_decay"] = schedule["wd"]
    b = ours["before"]
    mu = asit_export(b["opt"]["mu"], n_pos, (p_t, p_f))
    nu = asit_export(b["opt"]["nu"], n_pos, (p_t, p_f))
    _set_adam_state(torch, opt, named, mu, nu, step, "torch")
    opt.step()
    with torch.no_grad():  # the EMA loop of train_one_epoch
        m = schedule["ema"]
        for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

    return Theirs(
        loss=float(loss.detach()),
        parts={"loss_cls": float(clsloss), "loss_data": float(dtaloss), "loss_rec": float(recloss)},
        grads=grads,
        params_before=params_before,
        params_after=_numpy(named),
        teacher_after={
            k: v.detach().numpy().copy()
            for k, v in teacher.named_parameters()
            if not k.startswith("head_recons.") and not k.endswith("weight_g")
        },
        buffers={
            "centre_cls": loss_cls.center.numpy()[0].copy(),
            "centre_data": loss_data.center.numpy()[0].copy(),
        },
        schedule=schedule,
        stand_ins=stand_ins,
    )


def asit_compare(trainer, ours: dict, theirs: Theirs):
    enc = trainer.enc_cfg
    p_t, p_f = (int(x) for x in enc.patch_size)
    n_pos = (int(trainer.method.cfg.crop_frames) // p_t) * (int(enc.n_mels) // p_f) + 1
    b, a = ours["before"], ours["after"]
    exp = lambda tree: asit_export(tree, n_pos, (p_t, p_f))  # noqa: E731
    g, p_after, t_after = exp(ours["grads"]), exp(a["params"]), exp(a["teacher"])
    names = list(theirs.grads)
    pairs = {
        "grad": {k: (g[k], theirs.grads[k]) for k in names},
        "param": {k: (p_after[k], theirs.params_after[k]) for k in names},
        "before": {k: theirs.params_before[k] for k in names},
        "teacher": {k: (t_after[k], theirs.teacher_after[k]) for k in theirs.teacher_after},
        "teacher_before": exp(b["teacher"]),
    }
    state = {k: (a["method"][k], theirs.buffers[k]) for k in ("centre_cls", "centre_data")}
    scalars = {k: (ours["metrics"][k], v) for k, v in theirs.parts.items()}
    return pairs, state, scalars, {}


ASIT_GROUPS = (
    (r"backbone\.patch_embed\.", "patch_embed"),
    (r"backbone\.cls_token", "cls_token"),
    (r"backbone\.pos_embed", "pos_embed"),
    (r"backbone\.blocks\.\d+\.(norm1|attn)\.", "blocks.attn"),
    (r"backbone\.blocks\.\d+\.(norm2|mlp)\.", "blocks.mlp"),
    (r"backbone\.norm\.", "final_norm"),
    (r"head_cls\.mlp\.", "dino_head.mlp"),
    (r"head_cls\.(cls|data)_layer\.", "dino_head.prototypes"),
    (r"head_recons\.mlp\.", "rec_head.mlp"),
    (r"head_recons\.convTrans\.", "rec_head.deconv"),
)


def asit_group(name: str) -> str:
    return tensor_group(name, ASIT_GROUPS)


# ----------------------------------------------------------------------------------------------------------
# Batch, comparison, report
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Official:
    """What parity needs of one method's official code: where it lives (``files`` mark a checkout), the
    settings that make our step comparable (identity views where theirs are injected; padding masked where
    their model takes lengths), whether rows get uneven lengths, the random draws of ours injected into
    theirs, their step, the comparison and the tensor groups of the report."""

    repository: str
    files: tuple[str, ...]
    our_settings: dict
    uneven_lengths: bool
    draws: tuple[str, ...]
    step: Callable
    compare: Callable
    group_of: Callable


def _atst_frame_files():
    from atst_jax.tools.bench_official import MODEL_FILE

    return (MODEL_FILE,)


OFFICIAL = {
    "atst_frame": Official(
        "github.com/Audio-WestlakeU/audiossl",
        _atst_frame_files(),
        # The official model masks the padding of the uneven rows below by their lengths (in its training a
        # short clip's zero padding counts as signal instead: ``pad_is_signal``, our default). Its step runs
        # here as one process, whose loss is the mean over its masked tokens: one loss group.
        dict(aug_view1=False, aug_view2=False, pad_is_signal=False, loss_groups=1),
        True,
        ("span_mask",),
        atst_frame_official,
        atst_frame_compare,
        atst_frame_group,
    ),
    "asit": Official(
        "github.com/Sara-Ahmed/ASiT",
        ASIT_FILES,
        {},
        False,
        ("gmml_corrupt",),
        asit_official,
        asit_compare,
        asit_group,
    ),
}


def official_of(method: str, where: str) -> Official:
    if method not in OFFICIAL:
        raise ParityError(f"{where}: method {method!r}; parity covers {', '.join(OFFICIAL)}")
    return OFFICIAL[method]


def make_batch(trainer, seed: int) -> dict:
    """Random log-mels in [-1, 1]; rows of uneven valid length where the official model masks padding
    (ATST-Frame), full crops otherwise (ASiT: the official ViT has no padding mask)."""
    rng = np.random.default_rng(seed + 1)
    b = int(trainer.config.train.global_batch)
    n_mels = int(trainer.enc_cfg.n_mels)
    batch = {}
    for crop in trainer.method.inputs():
        t = crop.frames
        batch[crop.name] = rng.uniform(-1.0, 1.0, (b, n_mels, t)).astype(np.float32)
        if OFFICIAL[trainer.config.method].uneven_lengths:
            cut = [0] + [int(rng.integers(1, max(2, t // 4))) for _ in range(b - 1)]
            batch[crop.length_key] = (t - np.array(cut)).astype(np.int32)
        else:
            batch[crop.length_key] = np.full((b,), t, np.int32)
    return batch


def compare(trainer, ours: dict, theirs: Theirs, group_of) -> dict:
    method = trainer.config.method
    pairs, state, scalars, counts = OFFICIAL[method].compare(trainer, ours, theirs)
    total = np.sqrt(sum(norm(t) ** 2 for _, t in pairs["grad"].values()))
    groups: dict[str, dict] = {}

    def worst(group, kind, name, value):
        row = groups.setdefault(group, {"tensors": 0})
        if kind == "grad":
            row["tensors"] += 1
        cur = row.get(kind)
        if cur is None or value > cur[0]:
            row[kind] = (value, name)

    zero = []
    for name, (o, t) in pairs["grad"].items():
        group = group_of(name)
        if norm(o) < ZERO_GRAD * total and norm(t) < ZERO_GRAD * total:
            zero.append(name)
            worst(group, "grad", name, 0.0)
        else:
            worst(group, "grad", name, rel_err(o, t))
        po, pt = pairs["param"][name]
        before = pairs["before"][name]
        worst(group, "param", name, rel_err(po, pt))
        worst(group, "update", name, rel_err(np.float64(po) - before, np.float64(pt) - before))
        moved = rel_err(pt, before)
        cur = groups[group].get("moved")
        if cur is None or moved < cur[0]:
            groups[group]["moved"] = (moved, name)
    for name, (o, t) in pairs["teacher"].items():
        worst(group_of(name), "teacher", name, rel_err(o, t))
        tb = pairs["teacher_before"][name]
        cur = groups[group_of(name)].get("teacher_moved")
        m = rel_err(t, tb)
        if cur is None or m < cur[0]:
            groups[group_of(name)]["teacher_moved"] = (m, name)

    checks = []

    def check(what, value, tol, kind):
        checks.append({"what": what, "value": value, "tol": tol, "kind": kind, "ok": bool(value <= tol)})

    check("loss", abs(ours["loss"] - theirs.loss), LOSS_ATOL, "abs")
    for k, (o, t) in scalars.items():
        check(k, abs(o - t), LOSS_ATOL, "abs")
    for k, (o, t) in state.items():
        check(k, rel_err(o, t), PARAM_RTOL, "rel")
    for k, (o, t) in counts.items():
        check(f"{k} (ours {o}, theirs {t})", float(o != t), 0.0, "equal")
    for k, t in theirs.schedule.items():
        o = ours["schedule"].get(k)
        if k == "teacher_temp":
            o = ours["metrics"]["teacher_temp"]
        check(f"schedule {k}", rel_err(o, t), SCHED_RTOL, "rel")
    for group, row in groups.items():
        check(f"grad {group} ({row['grad'][1]})", row["grad"][0], GRAD_RTOL, "rel")
        check(f"param {group} ({row['param'][1]})", row["param"][0], PARAM_RTOL, "rel")
        if "teacher" in row:
            check(f"teacher {group} ({row['teacher'][1]})", row["teacher"][0], PARAM_RTOL, "rel")
    return {
        "method": method,
        "loss": {"ours": ours["loss"], "theirs": theirs.loss},
        "scalars": {k: {"ours": o, "theirs": t} for k, (o, t) in scalars.items()},
        "schedule": {"ours": ours["schedule"], "theirs": theirs.schedule},
        "groups": {
            g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
            for g, row in groups.items()
        },
        "zero_grads": zero,
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
        "stand_ins": theirs.stand_ins,
        "tolerances": {
            "loss_abs": LOSS_ATOL,
            "grad_rel": GRAD_RTOL,
            "param_rel": PARAM_RTOL,
            "schedule_rel": SCHED_RTOL,
            "zero_grad_frac": ZERO_GRAD,
        },
    }


def _fmt(cell) -> str:
    return "-" if cell is None else f"{cell[0]:.2e}"


def print_report(result: dict) -> None:
    print(
        f"parity {result['method']}: {result['config']} {' '.join(result['sets'])}, batch {result['batch']}, "
        f"step {result['step']}, seed {result['seed']}, official side {result['official_dtype']}"
    )
    print(
        f"tolerances: loss/parts {LOSS_ATOL:g} abs; gradients {GRAD_RTOL:g}, parameters / teacher / state "
        f"{PARAM_RTOL:g}, schedules {SCHED_RTOL:g} relative (per tensor)"
    )
    lo, lt = result["loss"]["ours"], result["loss"]["theirs"]
    print(f"loss: ours {lo:.8f}  theirs {lt:.8f}  |diff| {abs(lo - lt):.2e}")
    for k, v in result["scalars"].items():
        print(
            f"  {k}: ours {v['ours']:.8f}  theirs {v['theirs']:.8f}  |diff| {abs(v['ours'] - v['theirs']):.2e}"
        )
    s_t = result["schedule"]["theirs"]
    print(
        "schedule: " + ", ".join(f"{k} {s_t[k]:.6g}" for k in s_t) + " (theirs; ours within tolerance below)"
    )
    head = f"{'group':22s} {'n':>3s} {'grad':>9s} {'param':>9s} {'update*':>9s} {'moved':>9s} {'teacher':>9s}  worst grad tensor"
    print(head)
    for g, row in result["groups"].items():
        print(
            f"{g:22s} {row['tensors']:3d} {_fmt(row.get('grad')):>9s} {_fmt(row.get('param')):>9s} "
            f"{_fmt(row.get('update')):>9s} {_fmt(row.get('moved')):>9s} {_fmt(row.get('teacher')):>9s}  "
            f"{row['grad'][1]}"
        )
    print("  * update: relative difference of the step's change (information only); moved: smallest relative")
    print("    change of a parameter by the step (theirs)")
    if result["zero_grads"]:
        print(
            f"zero in exact arithmetic (below {ZERO_GRAD:g} of the total on both sides): {result['zero_grads']}"
        )
    print("stand-ins: " + "; ".join(result["stand_ins"]))
    bad = [c for c in result["checks"] if not c["ok"]]
    for c in bad:
        print(f"FAIL {c['what']}: {c['value']:.3e} > {c['tol']:g} ({c['kind']})")
    print(
        f"{'PASS' if not bad else 'FAIL'}: {len(result['checks']) - len(bad)}/{len(result['checks'])} checks"
    )


def run(args) -> dict:
    import jax

    from atst_jax.tools.bench_official import OfficialError

    try:
        import torch
    except ImportError as e:
        raise OfficialError(f"parity needs PyTorch: {e}") from None
    official = Path(args.official).expanduser()
    if not official.is_dir():
        raise OfficialError(f"--official {args.official}: no such directory")
    from atst_jax.config import load_config

    recipe = official_of(load_config(args.config).method, f"--config {args.config}")
    # A wrong checkout fails before anything is built or compiled.
    if not all((official / f).is_file() for f in recipe.files):
        raise OfficialError(
            f"--official {args.official}: not a checkout of {recipe.repository} (no {' / '.join(recipe.files)})"
        )
    torch.manual_seed(args.seed)
    jax.config.update("jax_default_matmul_precision", "highest")
    config = our_config(args.config, args.batch, args.set)
    trainer = our_trainer(config)
    total = int(config.train.steps)
    step = int(config.optim.warmup_steps) if args.step is None else int(args.step)
    if not 0 <= step < total:
        raise ParityError(f"--step {step}: must be in [0, {total})")
    host = make_batch(trainer, args.seed)
    ours = our_step(trainer, host, step, args.seed, recipe.draws)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.official_dtype))
    try:
        theirs = recipe.step(args.official, trainer, ours, host, step)
    finally:
        torch.set_default_dtype(default_dtype)
    result = compare(trainer, ours, theirs, recipe.group_of)
    result.update(config=args.config, batch=args.batch, step=step, sets=list(args.set or []), seed=args.seed)
    result["official_dtype"] = args.official_dtype
    result["official"] = str(official.resolve())
    result["torch"] = torch.__version__
    result["jax_backend"] = jax.default_backend()
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--official", required=True, help="checkout of audiossl (atst_frame) or ASiT (asit)")
    p.add_argument("--config", required=True, help="configs/atst_frame.py:VARIANT or configs/asit.py:VARIANT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--step", type=int, default=None, help="schedule step (default: end of the LR warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--official-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="the official side's precision (float64: a reference for both float32 sides' rounding)",
    )
    p.add_argument("--set", action="append", help="config override KEY=VALUE, as --config.KEY=VALUE")
    p.add_argument("--json", default="", help="write the numbers here")


def main(argv=None) -> int:
    from atst_jax.cli import ArgumentParser, fail
    from atst_jax.tools import bench_step

    parser = ArgumentParser(prog="python -m atst_jax.bench parity")
    add_arguments(parser)
    args = bench_step.parse_args(parser, argv)  # + --config.KEY=VALUE overrides, into args.set
    if args.batch < 2:
        return fail("--batch must be at least 2 (BatchNorm / centres need a batch)")
    try:
        result = run(args)
    except UserError as e:  # ConfigError, OfficialError, ParityError
        return fail(e)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
