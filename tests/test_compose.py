"""The composed method (methods/compose.py, configs/compose.py): its parts recombined through the config.

Exactness: two combinations are the recipes' own losses — frame stem × span × BN-MLP × frame BYOL (one copy)
is ATST-Frame's single-pair loss, 2-D AaPE stem × inverse-block × cross-attention × regression + InfoNCE is
AaSP's loss without the utterance term — on the same parameters, batch and masks. Every other option (GMML,
DINO, reconstruction, clip BYOL, AaPE) runs in the real jitted train step, with analytic FLOPs
that agree with XLA's. Impossible combinations are one-line errors. The method-level contract checks
(1 = 8 devices, golden shardings, FLOPs, planner, bench, resume) run on its default in test_methods.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_train
from flax import nnx

from atst_jax import methods
from atst_jax import sharding as shd
from atst_jax.data import views
from atst_jax.sharding import ConfigError
from atst_jax.train import Trainer, load_config

CONFIG = str(ROOT / "configs" / "compose.py")


def _compose(spec="tiny", frames=128, depth=1, **parts):
    c = load_config(f"{CONFIG}:{spec}")
    c.compose.update(crop_frames=frames, **parts)
    c.model.update(depth=depth, drop_path=0.0)
    return c


def _batch(method, b=4, seed=0):
    crop = method.inputs()[0]
    rng = np.random.default_rng(seed)
    spec = rng.normal(size=(b, method.enc_cfg.n_mels, crop.frames)).astype(np.float32)
    length = np.full((b,), crop.frames, np.int32) - np.arange(b, dtype=np.int32) * 9  # uneven padding
    return {"spec": jnp.asarray(spec), "spec_length": jnp.asarray(length)}


def _fixed_key(monkeypatch, name):
    """Both methods draw their masks from different splits of the step key: make ``views.<name>`` use one
    fixed key so they see the same masks (everything else is then deterministic: no drop-path)."""
    real = getattr(views, name)
    monkeypatch.setattr(views, name, lambda key, *a, **kw: real(jax.random.key(7), *a, **kw))


def _copy(dst, src, names):
    for n in names:
        nnx.update(getattr(dst, n), nnx.state(getattr(src, n)))


def test_span_bn_mlp_frame_byol_is_atst_frames_single_pair_loss(monkeypatch):
    _fixed_key(monkeypatch, "span_mask")
    ref_cfg = load_config(str(ROOT / "configs" / "atst_frame.py") + ":tiny")
    # compose masks a short clip's padding; ATST-Frame does with pad_is_signal=False (its default is official).
    ref_cfg.atst_frame.update(
        crop_seconds=1.27, symmetric=False, aug_view1=False, aug_view2=False, pad_is_signal=False
    )
    ref_cfg.model.update(depth=1, drop_path=0.0)
    ref = methods.build(ref_cfg)
    cfg = _compose(masking="span", predictor="bn_mlp", num_masks=1, frame_byol=1.0, contrastive=0.0)
    cfg.compose.update(mask_ratio=0.65, mask_span=5, min_spans=2, proj_hidden=512, proj_dim=128)
    got = methods.build(cfg)
    assert ref.inputs()[0].frames == got.inputs()[0].frames == 128
    rs, rt, _ = ref.init(jax.random.key(0))
    gs, gt, _ = got.init(jax.random.key(1))
    _copy(gs, rs, ("encoder", "projector", "predictor"))
    _copy(gt, rt, ("encoder", "projector"))
    batch, key = _batch(got), jax.random.key(3)
    want, wm, _ = ref.loss(rs, rt, {}, batch, key, 0)
    have, _, _ = got.loss(gs, gt, {}, batch, key, 0)
    np.testing.assert_allclose(float(have), float(want), rtol=1e-5)
    assert 1.0 < float(want) < 2.5  # a real BYOL loss, not a trivially equal zero


def test_inverse_block_cross_attention_regression_contrastive_is_aasps_loss(monkeypatch):
    _fixed_key(monkeypatch, "inverse_block_mask")
    ref_cfg = load_config(str(ROOT / "configs" / "aasp.py") + ":tiny")
    ref_cfg.aasp.update(crop_frames=96, utterance_weight=0.0, contrast_weight=0.1, contrast_embed="pred")
    # Compose's regression is the data2vec 2.0 form (block outputs, the block sampler, plain MSE); AaSP's EAT
    # defaults differ in exactly those knobs.
    ref_cfg.aasp.update(
        mask_sampler="blocks", target_source="block", final_norm_eps=1e-6, loss_scale=1 / ref_cfg.model.width
    )
    # Compose masks a short clip's padding and keeps the pre-norm trunk; AaSP's EAT defaults pad and post-norm.
    ref_cfg.aasp.pad_is_signal = False
    ref_cfg.model.update(depth=1, drop_path=0.0, norm_style="pre")
    ref = methods.build(ref_cfg)
    a = ref.cfg
    cfg = _compose("tiny,patch2d_aape", frames=96, masking="inverse_block", predictor="cross_attention")
    cfg.compose.update(
        frame_byol=0.0, regression=1.0, contrastive=0.1, num_masks=a.num_masks, mask_ratio=a.mask_ratio,
        mask_block=a.mask_block, top_k_layers=a.top_k_layers, pred_dim=a.pred_dim, pred_depth=a.pred_depth,
        pred_heads=a.pred_heads, pred_mlp_ratio=a.pred_mlp_ratio, contrast_temp=a.contrast_temp,
    )  # fmt: skip
    got = methods.build(cfg)
    assert got.enc_cfg == ref.enc_cfg and got.num_visible() == ref.num_visible()
    rs, rt, _ = ref.init(jax.random.key(0))
    gs, gt, _ = got.init(jax.random.key(1))
    _copy(gs, rs, ("encoder", "predictor"))
    _copy(gt, rt, ("encoder",))
    batch, key = _batch(got), jax.random.key(3)
    want, wm, _ = ref.loss(rs, rt, {}, batch, key, 0)
    have, hm, _ = got.loss(gs, gt, {}, batch, key, 0)
    np.testing.assert_allclose(float(hm["loss_regression"]), float(wm["loss_reg"]), rtol=1e-5)
    np.testing.assert_allclose(float(hm["loss_contrastive"]), float(wm["loss_nce"]), rtol=1e-5)
    np.testing.assert_allclose(float(have), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(hm["std_pred"]), float(wm["std_pred"]), rtol=1e-5)


# Together with the default (frame stem × inverse-block × cross-attention × frame BYOL + InfoNCE, in
# test_methods.py) these cover every masking, predictor and objective, and the AaPE branch (its frame-stem form
# trains in tests/test_aape.py through configs/atst_frame_aape.py).
COMBOS = {
    "frame_span_bnmlp": (
        "tiny",
        dict(masking="span", predictor="bn_mlp", num_masks=2, frame_byol=1.0, regression=1.0,
             reconstruction=1.0, contrastive=0.1),
    ),
    "patch2d_aape_gmml_cross": (
        "tiny,patch2d_aape",
        dict(masking="gmml", predictor="cross_attention", num_masks=2, frame_byol=0.0, dino=1.0,
             clip_byol=1.0, regression=0.5, contrastive=0.0),
    ),
}  # fmt: skip


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_combination_trains_in_the_jitted_step_with_matching_flops(combo):
    spec, parts = COMBOS[combo]
    cfg = _compose(spec, frames=64 if "patch2d" not in spec else 96, depth=1, **parts)
    cfg.model.scan_layers = False  # XLA's cost analysis counts a scanned body once
    cfg.train.global_batch = 4
    trainer = Trainer(cfg, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    method = trainer.method
    step = trainer.jit_train_step()
    cost = step.lower(*trainer.abstract_step_inputs()).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert abs(cost["flops"] / trainer.step_flops - 1) < 0.10, (cost["flops"], trainer.step_flops)
    state = trainer.init(0)
    host = trainer.synthetic_batch(0)
    losses = []
    for _ in range(3):
        batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
        state, m = step(state, batch)
        m = jax.device_get(m)
        losses.append(float(m["loss"]))
    on = [o for o in ("frame_byol", "clip_byol", "dino", "reconstruction", "regression", "contrastive")
          if parts.get(o, getattr(method.cfg, o)) > 0]  # fmt: skip
    assert sorted(k[5:] for k in m if k.startswith("loss_")) == sorted(on)
    assert all(np.isfinite(losses)) and len(set(losses)) == 3, losses  # it trains (the same batch each step)
    assert float(m["std_tea"]) > 0.01 and float(m["std_pred"]) > 0.01
    if parts.get("dino"):  # the DINO centres are method state and moved
        assert float(jnp.abs(state["method"]["centre_cls"]).sum()) > 0
    # The teacher encodes each clip once; the student M copies.
    parts_ = method.flops_breakdown(4)
    n = method.num_tokens() + (1 if method.enc_cfg.use_cls else 0)
    assert parts_["teacher_tokens"] == 4 * n
    assert parts_["student_tokens"] == 4 * method.cfg.num_masks * n


def test_default_drops_the_masked_tokens_and_the_teacher_runs_once():
    method = methods.build(_compose())  # 32 tokens, 65 % masked, M = 4
    v = method.num_visible()
    assert v == round(32 * 0.35) and method.num_queries() == 32 - v
    parts = method.flops_breakdown(8)
    assert parts["teacher_tokens"] == 8 * 32 and parts["student_tokens"] == 8 * 4 * v
    assert method.ema_covers == ("encoder", "projector")


@pytest.mark.parametrize(
    "parts, message",
    [
        (dict(masking="inverse_block", predictor="bn_mlp"), "drops the masked tokens"),
        (dict(num_masks=1), ">= 2 for the contrastive"),
        (dict(frame_byol=0.0, contrastive=0.0), "at least one > 0"),
        (dict(masking="random"), "compose.masking='random'"),
        (dict(predictor="mlp"), "compose.predictor='mlp'"),
        (dict(masking="span", crop_frames=20), "span masking needs more than"),
        (dict(pred_heads=3), "divisible by pred_heads"),
    ],
)
def test_impossible_combinations_are_one_line_errors(parts, message):
    cfg = _compose()
    cfg.compose.update(parts)
    with pytest.raises(ConfigError, match=message) as e:
        methods.build(cfg)
    assert "\n" not in str(e.value)


def test_unknown_stem_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown stem 'conv'"):
        load_config(f"{CONFIG}:tiny,conv")


def test_default_learns_on_embedded_data_without_collapse(tmp_path, embedded_cache):
    """ATST-Frame's objective over AaSP's masking and predictor, 80 steps of batch 8 on 1.28 s crops of the
    embedded data: the frame-BYOL loss falls, the copies of a clip find each other, nothing collapses."""
    proc = run_train(  # a subprocess, so that its 80 steps run XLA-optimised (the suite compiles at -O0)
        ["--workdir", str(tmp_path), "--config.compose.crop_frames=128", "--config.train.steps=80",
         "--config.train.ckpt_every=80", "--config.train.log_every=10", "--config.train.global_batch=8",
         f"--config.data.cache_dir={embedded_cache}", "--config.data.num_clips=64"],
        optimized=True, config=CONFIG,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["loss_frame_byol"] < first["loss_frame_byol"] - 0.2, (first, last)
    assert last["nce_acc"] > 0.9 > first["nce_acc"]
    for k in ("std_tea", "std_pred"):  # ≈ 1/√128 ≈ 0.088 when healthy, → 0 on collapse
        assert last[k] > 0.03, (k, first[k], last[k])
