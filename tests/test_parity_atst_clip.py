"""Step parity of our ATST-Clip with the official PyTorch model of the ``audiossl==0.1`` wheel (float32, CPU).

Both sides get the same weights — a random student and an independent random teacher in our parameter tree
(random LayerNorm / BatchNorm scales and biases and BatchNorm statistics too, so that a swapped weight / bias,
a transpose or a student / teacher mix-up changes numbers), exported with
``atst_jax.export.convert.network_to_torch`` and loaded strictly — and the same two crops per clip (random
log-mel values in [-1, 1], an anchor of 65 frames and a positive of 49, rows padded with shorter lengths).
Compared:

- the loss (absolute 1e-5) and the ``std_cls`` collapse monitors;
- every student gradient — encoder, projector, predictor, through the export's names — as
  ``‖g_ours − g_theirs‖ / ‖g_theirs‖ < 1e-4`` per tensor; two gradients are zero in exact arithmetic
  (``ZERO_GRADS``) and are only checked to be negligible on both sides;
- the BatchNorm running statistics both forwards leave in the student's and the teacher's heads (train-mode
  statistics over the same ``2·B`` CLS rows: the official ``MultiCropWrapper`` runs the heads once on all
  crops' outputs, ours on ``[anchor; positive]``);
- the teacher after the EMA update, given the same updated student (ours moved along its gradient, loaded
  into the official student): the official ``update_teacher`` with the momentum of the official
  ``cosine_scheduler_step`` against our ``trainer.ema_update`` with ours (relative 1e-6 per tensor), so the
  optimisers do not enter.

Official (imported from the wheel, unchanged): ``ATST`` (``audiossl/models/atst/atst.py``) built by its own
constructor with ``arch="small"`` — the ``AST_small`` encoder of ``audio_transformer.py`` (D=384, 6 heads,
LayerNorm eps 1e-6, qkv without bias, ``pos_type="cut"``, CLS token: patch embedding, positions, CLS, the
masking path (inactive: ATST-Clip masks nothing), the final norm, the padding lengths), the student and
teacher ``MultiCropWrapper`` of ``byol.py`` (crops of equal size batched through the encoder, the
``build_mlp`` projector / predictor heads with BatchNorm1d), ``ByolLoss``, ``ATST.forward`` and
``ATST.update_teacher`` (EMA of encoder and projector parameters), and ``cosine_scheduler_step``.

Not official, or changed for the test:

- ``audiossl.modules.transformer`` is not in the wheel, and ``audio_transformer.py`` imports its ``Block``.
  Unless a real one is importable, a stand-in module is registered whose ``Block`` takes the official
  constructor arguments (``dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path,
  act_layer, norm_layer``) and ``forward(x, length=None, return_attention=False)``, has the official attribute
  names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and computes with OUR
  PyTorch block (``atst_jax/export/torch_encoder.py``), its two LayerNorms built from the ``norm_layer`` the
  official encoder passes. The official padding rule (−10000 added to the attention logits of keys at
  positions ≥ ``length``) is applied to it. Settings the test does not use (qkv bias, dropout, drop-path,
  another activation, ``return_attention``) raise.
- ``byol.compute_var`` (the monitors) sends a counter to CUDA and all-reduces over a process group; it is
  replaced by the same statistic on one process (all-reduces over one process are identities).
- ``AST_small`` fixes 12 blocks; the student's and the teacher's encoders are cut to their first two after
  construction (the blocks are independent modules). Drop-path is 0 (``drop_path_rate=0.0``), and the
  official trunc-normal init is skipped while building (every tensor is then overwritten by our weights).

Our side is ``Trainer._loss_and_grads`` (train.py's step: ``AtstClip.loss`` under ``jax.value_and_grad``) of
the ``small`` recipe at depth 2, drop-path 0, float32, with the method's random augmentation (``make_views``:
mixup and RandomResizeCrop) replaced by the identity, so both sides see the same crops.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from conftest import config_path  # noqa: E402

from atst_jax import sharding as shd  # noqa: E402
from atst_jax.checkpoint import from_pure, to_pure  # noqa: E402
from atst_jax.config import load_config  # noqa: E402
from atst_jax.export import convert, torch_encoder  # noqa: E402
from atst_jax.methods.atst_clip import CROPS  # noqa: E402
from atst_jax.tools import bench_parity  # noqa: E402
from atst_jax.trainer import Trainer, ema_update  # noqa: E402

OFFICIAL_VERSION = "0.1"
DEPTH = 2  # AST_small's width (384) and heads (6); two blocks instead of twelve
BATCH = 4
SECONDS = {"anchor": 0.64, "positive": 0.48}  # 65 and 49 frames: 16 and 12 tokens
STEP, TOTAL = 3, 10  # the step whose EMA momentum is used, of a 10-step run
LOSS_TOL = 1e-5
GRAD_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------------------
# The official code
# ----------------------------------------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _standin_transformer_module() -> types.ModuleType:
    """``audiossl.modules.transformer`` with a ``Block`` of the official signature built on our own block."""
    nn = torch.nn

    class Block(torch_encoder.Block):
        def __init__(
            self,
            dim,
            num_heads,
            mlp_ratio=4.0,
            qkv_bias=False,
            qk_scale=None,
            drop=0.0,
            attn_drop=0.0,
            drop_path=0.0,
            act_layer=nn.GELU,
            norm_layer=nn.LayerNorm,
        ):
            unsupported = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop)
            if any(unsupported.values()) or drop_path != 0.0 or act_layer is not nn.GELU:
                raise NotImplementedError(
                    f"stand-in Block: only qkv_bias=False, no dropout, drop_path=0 and nn.GELU are supported "
                    f"({unsupported}, drop_path={drop_path}, act_layer={act_layer})"
                )
            super().__init__(dim, num_heads, mlp_ratio)
            self.norm1 = norm_layer(dim)  # the official block's norms come from the encoder's norm_layer
            self.norm2 = norm_layer(dim)

        def forward(self, x, length=None, return_attention=False):
            if return_attention:
                raise NotImplementedError("stand-in Block: return_attention is not supported")
            pos = torch.arange(x.shape[1], device=x.device)
            if length is None:
                key_bias = x.new_zeros(x.shape[0], x.shape[1])
            else:  # the official padding rule: −10000 on the logits of keys at positions >= length
                key_bias = torch.where(pos[None, :] >= length[:, None], -10000.0, 0.0).to(x.dtype)
            return super().forward(x, key_bias)

    module = types.ModuleType("audiossl.modules.transformer")
    module.Block = Block
    module.__doc__ = "Test stand-in (tests/test_parity_atst_clip.py): the Block on atst_jax's PyTorch block."
    return module


@pytest.fixture(scope="module")
def official():
    """The official modules (``atst``, ``byol``, ``common``) and ``standin``: whether ``Block`` is ours.

    Skips when audiossl is not installed, except under CI (``CI`` set), where that is a failure."""
    saved = {k: os.environ.get(k) for k in ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}
    try:
        import audiossl  # noqa: F401  (its __init__ pins MKL/OMP threads: restored below)
    except ImportError as e:
        why = f"audiossl==0.1 is not installed ({e}); README command 2 installs it"
        if _in_ci():
            pytest.fail(f"CI must run the ATST-Clip parity test: {why}")
        pytest.skip(why)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    version = importlib.metadata.version("audiossl")
    if version != OFFICIAL_VERSION:
        pytest.fail(f"this test is written against audiossl=={OFFICIAL_VERSION}; {version} is installed")
    with pytest.MonkeyPatch.context() as mp:
        try:
            importlib.import_module("audiossl.modules.transformer")
            standin = False
        except ModuleNotFoundError:
            package = types.ModuleType("audiossl.modules")
            package.__path__ = []
            mp.setitem(sys.modules, "audiossl.modules", package)
            mp.setitem(sys.modules, "audiossl.modules.transformer", _standin_transformer_module())
            standin = True
        atst = importlib.import_module("audiossl.models.atst.atst")
        byol = importlib.import_module("audiossl.models.atst.byol")
        common = importlib.import_module("audiossl.utils.common")
        mp.setattr(byol, "compute_var", _single_process_var)
        yield types.SimpleNamespace(atst=atst, byol=byol, common=common, standin=standin)


def _single_process_var(y):
    """``byol.compute_var`` on one process: unbiased per-feature variance over all rows, ``sqrt(var + 1e-6)``."""
    y = y.reshape(-1, y.size(-1))
    n = float(y.size(0))
    s, ss = y.sum(0), (y * y).sum(0)
    return torch.sqrt(ss / (n - 1) - s * s / (n * (n - 1)) + 1e-6)


def official_model(official, depth=DEPTH):
    """The official ``ATST(arch="small")`` (drop-path 0) with its student and teacher encoders cut to ``depth``
    blocks (``AST_small`` fixes 12; the blocks are independent modules, the rest of the encoder is untouched).
    Its random trunc-normal init is skipped (every tensor is overwritten by :func:`load_network`): it is most
    of the cost of building twelve blocks twice."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules[official.atst.AST_small.__module__], "trunc_normal_", lambda t, **kw: t)
        model = official.atst.ATST(arch="small", ncrops=2, drop_path_rate=0.0)
    for net in (model.student, model.teacher):
        net.encoder.blocks = net.encoder.blocks[:depth]
    return model.train()


def load_network(net, sd):
    """Our exported ``{name: array}`` into an official network, strictly (every key and shape)."""
    net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------------------


def our_trainer(seconds, monkeypatch):
    """Trainer of the ``small`` ATST-Clip recipe at ``DEPTH`` blocks, drop-path 0, float32, with the views'
    random augmentation replaced by the identity (both sides must see the same crops)."""
    config = load_config(config_path("atst_clip") + ":small")
    config.model.update(depth=DEPTH, drop_path=0.0, dtype="float32")
    config.atst_clip.update(anchor_seconds=seconds["anchor"], positive_seconds=seconds["positive"])
    # The uneven lengths below compare our padding mask with the official model's own ``length`` masking
    # (what it uses between crops of different lengths); a short clip's zero padding counts as signal there
    # (``pad_is_signal``, the default), which would ignore those lengths.
    config.atst_clip.pad_is_signal = False
    config.train.update(global_batch=BATCH, steps=TOTAL)
    trainer = Trainer(config, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    monkeypatch.setattr(trainer.method, "make_views", lambda key, batch: {n: batch[n] for n in CROPS})
    return trainer


def random_tree(abstract, rng):
    """Random weights shaped like ``abstract`` (an ``nnx.State``): ``bench_parity.random_tree`` of its pure
    tree (scales, biases, encoder and head matrices and BatchNorm statistics each at their own scale, so a
    swapped weight / bias, a transpose or a head mix-up changes numbers)."""
    return bench_parity.random_tree(to_pure(abstract), rng)


def crops(trainer, rng):
    """Random log-mel crops in [-1, 1] and uneven valid lengths (padding masks exercised on both sides)."""
    batch = {}
    for name, frames in trainer.method.crop_frames().items():
        batch[name] = rng.uniform(-1.0, 1.0, (BATCH, 64, frames)).astype(np.float32)
        batch[f"{name}_length"] = (frames - np.array([0, 7, 20, frames - 13])).astype(np.int32)
    return batch


rel_err, norm = bench_parity.rel_err, bench_parity.norm


# Gradients that are zero in exact arithmetic on both sides, so only their size is checked: ATST-Clip masks
# nothing (``mask_embed`` is unused), and the final norm's bias shifts every CLS output by the same vector,
# which the projector's Linear maps to a per-feature constant that its train-mode BatchNorm subtracts.
ZERO_GRADS = ("encoder.mask_embed", "encoder.norm.bias")


# ----------------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------------


def test_step_matches_official_atst(official, monkeypatch):
    trainer = our_trainer(SECONDS, monkeypatch)
    rng = np.random.default_rng(0)
    abstract = trainer.abstract_state
    params = random_tree(abstract["params"], rng)
    stats = random_tree(abstract["stats"], rng)
    # A teacher unlike the student (as after some training), so a student/teacher mix-up changes numbers.
    teacher = random_tree(abstract["teacher"], rng)
    tstats = random_tree(abstract["teacher_stats"], rng)
    host = crops(trainer, rng)

    # Ours: train.py's loss and gradients (AtstClip.loss under jax.value_and_grad), at some step.
    state = {k: from_pure(abstract[k], v) for k, v in (("params", params), ("stats", stats))}
    state.update(
        teacher=from_pure(abstract["teacher"], teacher), tstats=from_pure(abstract["teacher_stats"], tstats)
    )
    (loss, (metrics, new_stats, new_tstats, _)), grads = jax.device_get(
        jax.jit(trainer._loss_and_grads)(
            state["params"],
            state["stats"],
            state["teacher"],
            state["tstats"],
            {},
            host,
            jax.random.key(0),
            np.int32(STEP),
        )
    )

    # Theirs: the official forward (teacher on both crops, student on both, ByolLoss) and backward.
    model = official_model(official)
    load_network(model.student, convert.network_to_torch(params, stats))
    load_network(model.teacher, convert.network_to_torch(teacher, tstats))
    melspecs = [torch.from_numpy(host[n])[:, None] for n in CROPS]  # [B, 1, 64, T] as the official loader
    lengths = [torch.from_numpy(host[f"{n}_length"]).long() for n in CROPS]
    their_loss, std_s, std_t = model(melspecs, lengths)
    their_loss.backward()

    # Loss and collapse monitors.
    assert abs(float(loss) - their_loss.item()) < LOSS_TOL, (float(loss), their_loss.item())
    assert abs(float(metrics["std_cls_stu"]) - std_s.item()) < LOSS_TOL
    assert abs(float(metrics["std_cls_tea"]) - std_t.item()) < LOSS_TOL

    # Every student gradient, through the export's names.
    ours = convert.network_to_torch(to_pure(grads), stats)
    theirs = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
        for name, p in model.student.named_parameters()
    }
    assert set(theirs) <= set(ours) and set(ZERO_GRADS) <= set(theirs)
    total = np.sqrt(sum(norm(g) ** 2 for g in theirs.values()))
    for name in ZERO_GRADS:
        assert norm(theirs[name]) < 1e-6 * total and norm(ours[name]) < 1e-6 * total, name
    errors = {name: rel_err(ours[name], g) for name, g in theirs.items() if name not in ZERO_GRADS}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, (worst, errors[worst])

    # BatchNorm running statistics after the forward: the same 2·B rows on both sides, for every head.
    for net, after, heads in (
        (model.student, to_pure(new_stats), ("projector", "predictor")),
        (model.teacher, to_pure(new_tstats), ("projector",)),
    ):
        sd = net.state_dict()
        for head in heads:
            bn = after[head]["bn"]
            for n in ("running_mean", "running_var"):
                assert rel_err(bn[n], sd[f"{head}.1.{n}"].numpy()) < GRAD_RTOL, (head, n)
            assert int(bn["num_batches_tracked"]) == int(sd[f"{head}.1.num_batches_tracked"]) == 6

    # EMA: the same updated student on both sides (ours moved by its gradient, loaded into theirs), each
    # side's own momentum at STEP, then the official update_teacher and our ema_update.
    updated = jax.tree.map(lambda p, g: p - 0.05 * g / total, params, to_pure(grads))
    load_network(model.student, convert.network_to_torch(updated, stats))
    m_ours = float(trainer.ema_fn(np.int32(STEP)))
    m_theirs = float(official.common.cosine_scheduler_step(trainer.config.optim.ema, 1, TOTAL, 0)[STEP])
    assert abs(m_ours - m_theirs) < 1e-6 and m_theirs < 0.995
    model.update_teacher(m_theirs)
    after = ema_update(
        state["teacher"], from_pure(abstract["params"], updated), m_ours, trainer.method.ema_covers
    )
    ours = convert.network_to_torch(jax.device_get(to_pure(after)), tstats)
    before = convert.network_to_torch(teacher, tstats)
    theirs = {name: p.detach().numpy() for name, p in model.teacher.named_parameters()}
    assert set(theirs) <= set(ours) and any(k.startswith("projector.") for k in theirs)
    for name, t in theirs.items():
        assert rel_err(t, before[name]) > 1e-4, name  # the update moved it 100× the tolerance below, or more
        assert rel_err(ours[name], t) < 1e-6, name
