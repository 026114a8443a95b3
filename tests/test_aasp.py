"""AaSP's parts (methods/aasp.py, models/masked_prediction.py, views.inverse_block_mask): masks keep exactly the
configured visible count, the multi-view InfoNCE against a hand computation, cross-attention queries that do
not see each other, targets, the teacher encoding each clip once and the student only the visible tokens, the
FLOPs breakdown. The method-level checks (1 = 8 devices, golden shardings, FLOPs vs XLA, planner, bench,
resume) are in test_methods.py; the 100-step run on the embedded data is below."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, cli_env
from flax import nnx

from atst_jax.checkpoint import read_checkpoint
from atst_jax.data import views
from atst_jax.methods.aasp import Aasp
from atst_jax.models.aape import AaPE
from atst_jax.models.encoder import FrameAST
from atst_jax.models.masked_prediction import (
    CrossPredictor,
    instance_norm,
    layer_targets,
    multi_view_info_nce,
)
from atst_jax.models.stems import PatchStem2D
from atst_jax.train import load_config

CONFIG = str(ROOT / "configs" / "aasp.py")


def _config(**aasp):
    c = load_config(CONFIG + ":tiny")
    c.aasp.update(crop_frames=96, **aasp)  # 6 × 8 = 48 tokens
    c.model.depth = 2
    return c


def test_inverse_block_masks_keep_exactly_the_visible_count():
    grid, visible = (12, 8), 19  # 96 tokens, 80 % masked
    n = grid[0] * grid[1]
    valid = jnp.ones((64, n), bool).at[1, 60:].set(False)  # clip 1 has 60 real tokens
    vis, hid = jax.jit(lambda k: views.inverse_block_mask(k, 64, grid, visible, block=(5, 5), valid=valid))(
        jax.random.key(0)
    )
    vis, hid = np.asarray(vis), np.asarray(hid)
    assert vis.shape == (64, visible) and hid.shape == (64, n - visible)
    for i in range(64):  # exactly `visible` distinct tokens, and the masked ones are the rest
        assert len(set(vis[i])) == visible
        assert sorted(set(vis[i]) | set(hid[i])) == list(range(n))
    assert vis[1].max() < 60  # padding is never visible while enough real tokens remain
    # Blocks, not scattered tokens: most visible tokens have a visible neighbour in time or frequency.
    grid_vis = np.zeros((64, *grid), bool)
    for i in range(64):
        grid_vis[i].reshape(-1)[vis[i]] = True
    t_nb = np.zeros_like(grid_vis)
    t_nb[:, 1:] |= grid_vis[:, :-1]
    t_nb[:, :-1] |= grid_vis[:, 1:]
    t_nb[:, :, 1:] |= grid_vis[:, :, :-1]
    t_nb[:, :, :-1] |= grid_vis[:, :, 1:]
    assert (grid_vis & t_nb).sum() > 0.9 * grid_vis.sum()
    # Different copies get different masks.
    assert len({tuple(v) for v in vis}) > 60


def test_multi_view_info_nce_by_hand():
    rng = np.random.default_rng(0)
    clips, views_, tau = 3, 2, 0.2
    emb = rng.normal(size=(clips * views_, 5))
    z = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    want = []
    for i in range(clips * views_):
        others = [a for a in range(clips * views_) if a != i]
        denom = sum(np.exp(z[i] @ z[a] / tau) for a in others)
        pos = [p for p in others if p // views_ == i // views_]
        want.append(-np.mean([np.log(np.exp(z[i] @ z[p] / tau) / denom) for p in pos]))
    got = multi_view_info_nce(jnp.asarray(emb, jnp.float32), views_, tau)
    np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)
    # Three views per clip: two positives per anchor, averaged.
    emb3 = rng.normal(size=(6, 4))
    z3 = emb3 / np.linalg.norm(emb3, axis=1, keepdims=True)
    s = np.exp(z3 @ z3.T / tau)
    np.fill_diagonal(s, 0.0)
    want3 = np.mean(
        [
            -np.mean([np.log(s[i, p] / s[i].sum()) for p in range(6) if p // 3 == i // 3 and p != i])
            for i in range(6)
        ]
    )
    np.testing.assert_allclose(
        float(multi_view_info_nce(jnp.asarray(emb3, jnp.float32), 3, tau)), want3, rtol=1e-5
    )
    # Views of one clip that agree and clips that differ give a low loss; swapped partners a high one.
    good = jnp.asarray(np.repeat(np.eye(3), 2, axis=0), jnp.float32)
    assert float(multi_view_info_nce(good, 2, 0.1)) < 0.01
    assert float(multi_view_info_nce(jnp.roll(good, 1, axis=0), 2, 0.1)) > 5.0


def test_cross_attention_queries_do_not_see_each_other():
    module = CrossPredictor(32, 16, 2, 4, rngs=nnx.Rngs(params=0))
    jitted = nnx.jit(lambda mod, q, kv, valid: mod(q, kv, valid))
    pred = lambda q, kv, valid: jitted(module, q, kv, valid)  # noqa: E731
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    kv_valid = jnp.array([[True] * 5, [True, True, True, False, False]])
    out = pred(q, kv, kv_valid)
    moved = pred(q.at[:, 3].add(5.0), kv, kv_valid)
    others = [i for i in range(7) if i != 3]
    np.testing.assert_allclose(np.asarray(moved[:, others]), np.asarray(out[:, others]), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(moved[:, 3] - out[:, 3]).max()) > 1e-3
    # Any query subset gives the same answers (no interaction), and padded keys are ignored.
    np.testing.assert_allclose(
        np.asarray(pred(q[:, :2], kv, kv_valid)), np.asarray(out[:, :2]), rtol=1e-5, atol=1e-6
    )
    junk = kv.at[1, 3:].set(100.0)
    np.testing.assert_allclose(
        np.asarray(pred(q, junk, kv_valid)[1]), np.asarray(out[1]), rtol=1e-5, atol=1e-6
    )
    assert (
        float(jnp.abs(pred(q, kv.at[:, 0].add(jnp.arange(32.0) / 8), kv_valid) - out).max()) > 1e-3
    )  # keys matter


def test_targets_are_instance_normalised_top_k_means():
    rng = np.random.default_rng(2)
    layers = jnp.asarray(rng.normal(size=(4, 2, 6, 8)) * 3 + 1, jnp.float32)  # [L, B, N, D]
    w = jnp.ones((2, 6)).at[1, 4:].set(0.0)
    y = np.asarray(layer_targets(layers, 2, w))
    inorm = np.asarray(jax.vmap(lambda x: instance_norm(x, w))(layers[2:]))
    mean = inorm.mean(0)
    want = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    # Instance norm: zero mean / unit variance per channel over the real tokens only.
    x = np.asarray(instance_norm(layers[0], w))
    np.testing.assert_allclose(x[1, :4].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x[1, :4].std(0), 1.0, rtol=1e-3)


def test_teacher_encodes_each_clip_once_and_the_student_only_visible_tokens(monkeypatch):
    """A trace count: every trunk call of one loss evaluation, with its input shape. The teacher's is the
    only full-sequence call ([B, 1 + N]); the student's is [B·M, 1 + V] — the patch projection runs once per
    clip, the AaPE branch once per student copy (each from its own visible tokens)."""
    c = _config(num_masks=4)
    method = Aasp(c)
    calls, embeds, aape_rows = [], [], []
    trunk, patchify, features = FrameAST.trunk, PatchStem2D.patchify, AaPE.token_features

    def counting_trunk(self, x, *a, **k):
        calls.append(x.shape[:2])
        return trunk(self, x, *a, **k)

    def counting_patchify(self, spec):
        embeds.append(spec.shape[0])
        return patchify(self, spec)

    def counting_features(self, *a, **k):
        out = features(self, *a, **k)
        aape_rows.append(out.shape[0])
        return out

    monkeypatch.setattr(FrameAST, "trunk", counting_trunk)
    monkeypatch.setattr(PatchStem2D, "patchify", counting_patchify)
    monkeypatch.setattr(AaPE, "token_features", counting_features)
    b = 3
    batch = {"spec": jnp.zeros((b, 128, 96)), "spec_length": jnp.full((b,), 96, jnp.int32)}

    def one_loss():
        student, teacher, state = method.init(jax.random.key(0))
        calls.clear(), embeds.clear(), aape_rows.clear()  # count the loss only
        return method.loss(student, teacher, state, batch, jax.random.key(1), 0)

    nnx.eval_shape(one_loss)
    n, v, m = method.num_tokens(), method.num_visible(), 4
    assert (n, v) == (48, 10)
    assert calls == [(b, 1 + n), (b * m, 1 + v)], calls  # teacher once per clip; student visible only
    assert embeds == [b, b]  # the patch projection: once for the teacher, once (not M times) for the student
    assert aape_rows == [b, b * m]  # AaPE: the teacher's clean clips, the student's M copies
    # The FLOPs breakdown says the same: the teacher's term does not grow with M, the student's does.
    f4 = method.flops_breakdown(8)
    f16 = Aasp(_config(num_masks=16)).flops_breakdown(8)
    assert f4["teacher"] == f16["teacher"] and f16["student"] > 3 * f4["student"] * 0.9
    assert f4["teacher_tokens"] == 8 * (1 + n) and f4["student_tokens"] == 8 * 4 * (1 + v)


def test_ema_momentum_is_linear_then_constant():
    c = load_config(CONFIG + ":base")
    method = Aasp(c)
    np.testing.assert_allclose(float(method.ema_momentum(0)), 0.9998, rtol=1e-7)
    np.testing.assert_allclose(float(method.ema_momentum(50_000)), 0.5 * (0.9998 + 0.99999), rtol=1e-7)
    np.testing.assert_allclose(float(method.ema_momentum(300_000)), 0.99999, rtol=1e-7)
    assert (c.optim.b1, c.optim.b2, c.optim.wd_start, c.optim.wd_schedule) == (0.9, 0.95, 0.05, "constant")
    assert (c.optim.grad_clip, c.optim.clip_norm) == ("global_norm", 4.0)
    assert c.aasp.num_masks == 16 and c.aasp.mask_ratio == 0.8 and Aasp(c).num_visible() == 102  # of 512


def test_aasp_cli_trains_on_embedded_fbank_lowering_the_loss_without_collapse(tmp_path, embedded_cache):
    """``python -m atst_jax.train --config configs/aasp.py:tiny`` (cut further: batch 8, 128 frames, 2 blocks)
    for 100 steps, checkpoints every 20 kept (the first at 20): exit 0, the loss falls, the teacher's token
    spread stays well above 0. One run serves as the CLI test and the learning test."""
    proc = subprocess.run(
        [sys.executable, "-m", "atst_jax.train", "--config", CONFIG + ":tiny", "--workdir", str(tmp_path),
         "--config.train.steps=100", "--config.train.ckpt_every=20", "--config.train.keep_every=20",
         # cut for the test's CPU budget: batch 8, 128-frame crops (8 × 8 tokens), 2 blocks
         "--config.train.global_batch=8", "--config.aasp.crop_frames=128", "--config.model.depth=2",
         f"--config.data.cache_dir={embedded_cache}", "--config.data.num_clips=64"],
        capture_output=True, text=True, env=cli_env(1, optimized=True), cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "20").is_dir() and (tmp_path / "checkpoints" / "100").is_dir()
    assert "std_tea" in proc.stdout and "aasp tiny" in proc.stdout
    assert "within_tea" in proc.stdout and "dim_tea" in proc.stdout
    _, config, state = read_checkpoint(tmp_path)
    assert config["method"] == "aasp" and "aape" in state["teacher"]["encoder"]
    assert np.abs(state["params"]["encoder"]["aape"]["fuse"]["kernel"]).max() > 0  # AaPE left zero
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    window = lambda rs, k: float(np.mean([r[k] for r in rs]))
    early, late = rows[:2], rows[-3:]
    assert window(late, "loss") < window(early, "loss") - 0.1, (window(early, "loss"), window(late, "loss"))
    assert window(late, "loss_reg") < window(early, "loss_reg"), (
        window(early, "loss_reg"),
        window(late, "loss_reg"),
    )
    for r in rows:  # healthy ≈ 1/√128 ≈ 0.09 for D = 128; collapse → 0
        assert r["std_tea"] > 0.02 and r["std_pred"] > 0.005, r

    # The trained teacher exports (ViT keys + aape.*), loads strict=True into our PyTorch AaPE-ViT and matches
    # the JAX encoder; HEAR's load_model and the JAX embedder give the same clip embedding.
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from atst_jax.embed import Embedder, read_run_encoder
    from atst_jax.export import __main__ as export_cli
    from atst_jax.export import hear
    from atst_jax.export.torch_aape import AaPEViT
    from atst_jax.inference import encoder_from_params, run_encoder_config

    out = tmp_path / "aasp.safetensors"
    assert export_cli.main(["--workdir", str(tmp_path), "--format", "safetensors", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "asit_encoder+aape" and json.loads(meta["aape"])["kernels"] == 2
    sd = load_file(str(out))
    assert sum(k.startswith("aape.") for k in sd) == 11 and len(sd) == 12 * 2 + 6 + 11
    vit = AaPEViT.from_state_dict(sd, json.loads(meta["aape"]), heads=2, strict=True).eval()
    enc = state["teacher"]["encoder"]
    jax_enc = encoder_from_params(enc, run_encoder_config(config, enc))
    x = np.random.default_rng(0).normal(size=(2, 128, 128)).astype(np.float32)
    want = np.asarray(jax_enc(x, np.full((2,), 128, np.int32)))
    with torch.no_grad():
        got = vit(torch.from_numpy(x.transpose(0, 2, 1).copy())[:, None]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    model = hear.load_model(str(out))
    wave = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 32000 * 2)).astype(np.float32) * 0.1)
    scene = hear.get_scene_embeddings(wave, model).numpy()
    assert scene.shape == (1, model.scene_embedding_size) == (1, 2 * 2 * 128)
    emb, ts = hear.get_timestamp_embeddings(wave, model)
    assert emb.shape[:2] == ts.shape and emb.shape[2] == model.timestamp_embedding_size
    jax_model = Embedder(read_run_encoder(tmp_path)[0], chunk_frames=128)
    np.testing.assert_allclose(jax_model.clip_embedding(wave[0].numpy()), scene[0], atol=2e-4, rtol=2e-4)


def test_config_checks():
    from atst_jax.sharding import ConfigError

    with pytest.raises(ConfigError, match="num_masks"):
        Aasp(_config(num_masks=1)).check()
    with pytest.raises(ConfigError, match="contrast_embed"):
        bad = _config(contrast_embed="cls")
        bad.model.use_cls = False
        Aasp(bad).check()
    with pytest.raises(ConfigError, match="loss"):
        Aasp(_config(loss="l1")).check()
