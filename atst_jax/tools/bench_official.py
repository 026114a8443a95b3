"""The official PyTorch ATST-Frame train step, timed on random input for the accelerator suite (bench_gpu.py).

Nothing of the official code is part of this project: the user points ``--official PATH`` at a checkout of
Audio-WestlakeU/audiossl, and its modules are imported from there at run time. The model is built the way
its ``FrameATSTLightningModule`` does (``FrameATST(arch=...)``: student and teacher ``MultiCropWrapper``,
teacher initialised from the student, ``ByolLoss``), and one step is what its Lightning loop runs per batch:
zero the gradients, forward both views through teacher and student, loss, backward, AdamW step over
``get_params_groups(student)``, EMA update of the teacher (``update_teacher``).

What is stubbed, and why (none of it is on the timed path):

- ``pytorch_lightning`` (the Lightning module class is never built), ``transformers.optimization`` and
  ``fairseq.data.data_utils`` (imported at module level by ``model.py`` / ``random_mask.py``; the mask
  generator is data-side and never called here) are replaced by small stand-ins, so a bare image with
  PyTorch alone can run it.
- The optimizer is ``torch.optim.AdamW`` (the same decoupled-weight-decay update as the ``transformers``
  AdamW the official module uses, and the faster implementation of the two), so the rival is not slowed
  by an older optimizer loop.
- ``byol.compute_var`` (a collapse monitor) moves a counter to CUDA and all-reduces over a process group
  that a one-process benchmark does not have; it is replaced by the same statistic computed on the one
  process (with one process the all-reduces are identities).

Inputs are what the official data module produces for one batch: two views ``[B, 1, n_mels, T]`` of
random log-mels, full lengths, and one random token mask per clip shared by both views (``masks.extend([mask]
* 2)`` in its transform) with ``round(mask_ratio · N)`` masked tokens. Precision: ``fp32`` is the published
setting (its trainer leaves ``precision=16`` commented out; PyTorch's default keeps TF32 off for matmuls);
``bf16`` runs the forward under ``torch.autocast(dtype=torch.bfloat16)``, the fairest PyTorch rival to a
bf16 JAX step; ``tf32`` is fp32 with TF32 matmuls allowed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types
from pathlib import Path

from atst_jax.errors import UserError

MODEL_FILE = "audiossl/methods/atstframe/model.py"


class OfficialError(UserError):
    """The official code cannot be imported or built; reported as one line."""


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__bench_stub__ = True
    sys.modules[name] = module
    return module


def _install_stubs(torch) -> list[str]:
    """Stand-ins for the modules ``model.py`` imports but the train step does not use."""

    def not_here(*args, **kwargs):
        raise OfficialError(
            "a stubbed official helper was called (fairseq's mask generator): not benchmarked"
        )

    stubs = []
    lightning = _stub("pytorch_lightning", LightningModule=torch.nn.Module)
    stubs.append(lightning.__name__)
    transformers = _stub("transformers")
    transformers.optimization = _stub(
        "transformers.optimization", AdamW=torch.optim.AdamW, get_cosine_schedule_with_warmup=not_here
    )
    stubs.append("transformers.optimization")
    fairseq = _stub("fairseq")
    fairseq.data = _stub("fairseq.data")
    fairseq.data.data_utils = _stub("fairseq.data.data_utils", compute_mask_indices=not_here)
    stubs.append("fairseq.data.data_utils")
    return stubs


def load_official(path: str):
    """Imports the official ATST-Frame modules from the checkout at ``path``: ``(model, byol, common,
    stubs)``. Raises ``OfficialError`` (one line) if ``path`` is not that checkout or an import fails."""
    import torch

    root = Path(path).expanduser().resolve()
    if not (root / MODEL_FILE).is_file():
        raise OfficialError(
            f"--official {path}: not a checkout of github.com/Audio-WestlakeU/audiossl (no {MODEL_FILE})"
        )
    stubs = _install_stubs(torch)
    sys.path.insert(0, str(root))
    # audiossl/__init__.py pins MKL/OMP to one thread for its data loaders; keep the caller's settings.
    saved = {k: os.environ.get(k) for k in ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}
    try:
        import audiossl.methods.atstframe.byol as byol
        import audiossl.methods.atstframe.model as model
        import audiossl.utils.common as common
    except ImportError as e:
        raise OfficialError(
            f"--official {path}: importing the official ATST-Frame code failed: {e} "
            f"(it needs torch and einops; install the missing module)"
        ) from None
    except Exception as e:  # noqa: BLE001 -- any failure of foreign code at import: one line
        raise OfficialError(
            f"--official {path}: importing the official code failed: {type(e).__name__}: {e}"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for name in ("FrameATST",):
        if not hasattr(model, name):
            raise OfficialError(f"--official {path}: {MODEL_FILE} has no {name}; an unexpected version")
    if not hasattr(byol, "compute_var") or not hasattr(common, "get_params_groups"):
        raise OfficialError(f"--official {path}: byol.compute_var / utils.common.get_params_groups missing")
    return model, byol, common, stubs


def _single_process_var(torch):
    def compute_var(y):
        # The official statistic (per-feature std over all rows) on one process, without the process group.
        y = y.reshape(-1, y.size(-1))
        n = y.new_tensor(float(y.size(0)))
        s, ss = y.sum(0), (y * y).sum(0)
        var = ss / (n - 1) - s * s / (n * (n - 1))
        return torch.sqrt(var + 1e-6)

    return compute_var


def run(spec: dict) -> dict:
    """Times the official step per precision in ``spec["modes"]`` at ``spec["batch"]`` clips (halved on
    out-of-memory). ``spec``: path, arch, batch, frames, n_mels, mask_ratio, modes, warmup, steps, windows."""
    import torch

    model_mod, byol, common, stubs = load_official(spec["path"])
    byol.compute_var = _single_process_var(torch)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # the CPU dry run: one thread, so that it does not fight the planner beside it for cores
        torch.set_num_threads(1)
    out = {
        "path": str(Path(spec["path"]).resolve()),
        "arch": spec["arch"],
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "stubbed_modules": stubs,
        "replaced": ["byol.compute_var (single-process)", "transformers AdamW -> torch.optim.AdamW"],
        "modes": {},
    }
    for mode in spec["modes"]:
        batch, tries = spec["batch"], []
        while batch >= 1:
            try:
                r = _time_mode(torch, model_mod, common, spec, mode, batch, device)
                r["oom_at"] = tries
                out["modes"][mode] = r
                break
            except torch.OutOfMemoryError:
                tries.append(batch)
                batch //= 2
            finally:
                if cuda:  # the mode's model, optimizer and inputs are gone with _time_mode's frame
                    torch.cuda.empty_cache()
        else:
            out["modes"][mode] = {"status": "oom", "oom_at": tries}
    return out


def _time_mode(torch, model_mod, common, spec, mode, batch, device) -> dict:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default (convolutions only; the model has none)
    frames, n_mels = spec["frames"], spec["n_mels"]
    # As FrameATSTLightningModule builds it (its train.py passes spec_h = n_mels, patch 64 × 4).
    net = model_mod.FrameATST(
        arch=spec["arch"],
        symmetric=True,
        pos_type="cut",
        avg_blocks=0,
        patch_embed="Linear",
        spec_h=n_mels,
        patch_h=n_mels,
        patch_w=4,
        n_mels=n_mels,
    ).to(device)
    net.train()
    groups = common.get_params_groups(net.student)
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    opt.param_groups[0]["weight_decay"] = 0.04  # the official schedule sets group 0's decay each step
    n_tok = frames // 4
    k = max(1, round(spec["mask_ratio"] * n_tok))
    gen = torch.Generator().manual_seed(0)
    x = [(torch.rand(batch, 1, n_mels, frames, generator=gen) * 2 - 1).to(device) for _ in range(2)]
    lengths = [torch.full((batch,), frames, dtype=torch.long, device=device) for _ in range(2)]
    order = torch.rand(batch, n_tok, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, n_tok, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    masks = [mask.to(device)] * 2
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _, _ = net(x, lengths, masks)
        loss.backward()
        opt.step()
        net.update_teacher(0.996)
        losses.append(loss.detach())

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        step()
    sync()
    per_step = []
    for _ in range(spec["windows"]):
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        sync()
        per_step.append((time.perf_counter() - t0) / spec["steps"])
    med = statistics.median(per_step)
    result = {
        "status": "ok",
        "batch": batch,
        "frames": frames,
        "masked_tokens": k,
        "step_s_median": med,
        "step_s_windows": per_step,
        "clips_per_s": batch / med,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "losses": [float(v) for v in losses],
        "tf32_matmul": mode == "tf32",
        "autocast_bf16": mode == "bf16",
    }
    return result
