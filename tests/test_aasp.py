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

from atst_jax import methods
from atst_jax.checkpoint import read_checkpoint
from atst_jax.data import views
from atst_jax.methods.aasp import Aasp
from atst_jax.models.aape import AaPE
from atst_jax.models.encoder import EncoderConfig, FrameAST
from atst_jax.models.masked_prediction import (
    CrossPredictor,
    instance_norm,
    layer_targets,
    multi_view_info_nce,
)
from atst_jax.models.stems import PatchStem2D
from atst_jax.sharding import ConfigError
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
    assert (n, v) == (48, 9)  # EAT's count: int(48 · 0.2)
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
    # EAT's pretraining config and the fairseq defaults it keeps: 12 clips × 4 GPUs, Adam eps 1e-8, no
    # drop-path, peak LR 5e-4 (base_lr is per 256 clips), cosine to min_lr 0, FFN targets, EAT's sampler.
    assert c.train.global_batch == 48 and c.optim.eps == 1e-8 and c.model.drop_path == 0.0
    np.testing.assert_allclose(c.optim.base_lr * c.train.global_batch / 256, 5e-4, rtol=1e-12)
    assert c.optim.final_lr == 0.0 and (c.optim.warmup_steps, c.train.steps) == (53_333, 400_000)
    assert (c.aasp.target_source, c.aasp.mask_sampler, c.aasp.mask_prob_adjust) == ("ffn", "eat", 0.07)
    assert c.aasp.utterance_weight == 12 * 16 and c.aasp.loss_scale == 0.0


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

    # The trained teacher exports (post-norm ViT keys + aape.*, EAT's 16 kHz front end recorded), loads
    # strict=True into our PyTorch AaPE-ViT and matches the JAX encoder; HEAR's load_model (16 kHz) and the JAX
    # embedder give the same clip embedding.
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from atst_jax.eval.embed import Embedder, read_run_encoder
    from atst_jax.export import __main__ as export_cli
    from atst_jax.export import hear
    from atst_jax.export.torch_aape import AaPEViT
    from atst_jax.inference import encoder_from_params, run_encoder_config

    out = tmp_path / "aasp.safetensors"
    assert export_cli.main(["--workdir", str(tmp_path), "--format", "safetensors", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "asit_encoder+postnorm+aape" and json.loads(meta["aape"])["kernels"] == 2
    assert meta["features"] == "kaldi_fbank128_16k" and meta["norm_style"] == "post"
    sd = load_file(str(out))
    assert sum(k.startswith("aape.") for k in sd) == 11 and len(sd) == 12 * 2 + 6 + 11
    vit = AaPEViT.from_state_dict(sd, json.loads(meta["aape"]), heads=2, strict=True).eval()
    assert vit.norm_style == "post"
    enc = state["teacher"]["encoder"]
    jax_enc = encoder_from_params(enc, run_encoder_config(config, enc))
    x = np.random.default_rng(0).normal(size=(2, 128, 128)).astype(np.float32)
    want = np.asarray(jax_enc(x, np.full((2,), 128, np.int32)))
    with torch.no_grad():
        got = vit(torch.from_numpy(x.transpose(0, 2, 1).copy())[:, None]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    model = hear.load_model(str(out))
    assert model.sample_rate == 16000 and model.frontend.features == "kaldi_fbank128_16k"
    wave = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 16000 * 2)).astype(np.float32) * 0.1)
    scene = hear.get_scene_embeddings(wave, model).numpy()
    assert scene.shape == (1, model.scene_embedding_size) == (1, 2 * 2 * 128)
    emb, ts = hear.get_timestamp_embeddings(wave, model)
    assert emb.shape[:2] == ts.shape and emb.shape[2] == model.timestamp_embedding_size
    jax_model = Embedder(read_run_encoder(tmp_path)[0], chunk_frames=128, features="kaldi_fbank128_16k")
    np.testing.assert_allclose(jax_model.clip_embedding(wave[0].numpy()), scene[0], atol=2e-4, rtol=2e-4)


def test_eat_s_1024_frame_crop_trains_on_10_s_clips_of_998_frames(embedded_cache):
    """EAT pads a 10 s clip's 998 frames of its 16 kHz fbank to the 1024-frame crop and counts the padding:
    the trainer's data check lets such a crop through when the method counts padding as audio, and refuses
    it (a crop longer than every clip) when the padding would be masked."""
    from atst_jax import trainer as trainer_lib

    config = load_config(CONFIG + ":tiny")
    config.aasp.crop_frames, config.model.num_pos = 1024, 513  # 64 × 8 patches + CLS
    config.data.update(cache_dir=embedded_cache, num_clips=64)
    files = trainer_lib.data_files(config, method=methods.build(config))
    assert trainer_lib.check_data(config, methods.build(config), files) == "kaldi_fbank128_16k"
    config.aasp.pad_is_signal = False
    with pytest.raises(
        ConfigError, match=r"longer than the clips in the data \(longest of the first 64: 998"
    ):
        trainer_lib.check_data(config, methods.build(config), files)


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
    with pytest.raises(ConfigError, match="mask_sampler"):
        Aasp(_config(mask_sampler="random")).check()
    with pytest.raises(ConfigError, match="target_source"):
        Aasp(_config(target_source="attn")).check()


# --- EAT's choices (targets from the FFN outputs, loss weighting, inverse-block sampler) ----------------------
def _np_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def _np_blocks(params, x, valid, heads):
    """A NumPy forward of the pre-norm blocks from their stacked parameters: every block's output and its
    feed-forward branch (``fc2(GELU(fc1(LN(h))))``, before the residual add), each ``[L, B, K, D]``."""
    from scipy.special import erf

    blocks, ffns = [], []
    b, k, d = x.shape
    hd = d // heads
    bias = np.where(valid, 0.0, -10000.0)[:, None, None, :]
    for i in range(params["norm1"]["scale"].shape[0]):
        g = lambda *path, i=i: _get(params, path)[i]  # noqa: E731
        h = _np_layer_norm(x, g("norm1", "scale"), g("norm1", "bias"))
        qkv = h.reshape(b * k, d) @ g("attn", "qkv", "kernel").reshape(d, 3 * d) + g(
            "attn", "qkv", "bias"
        ).reshape(-1)
        q, kk, v = (qkv.reshape(b, k, 3, heads, hd)[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        logits = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, k, d)
        x = x + o @ g("attn", "proj", "kernel").reshape(d, d) + g("attn", "proj", "bias")
        h = _np_layer_norm(x, g("norm2", "scale"), g("norm2", "bias"))
        u = h @ g("mlp", "fc1", "kernel") + g("mlp", "fc1", "bias")
        u = 0.5 * u * (1.0 + erf(u / np.sqrt(2.0)))
        f = u @ g("mlp", "fc2", "kernel") + g("mlp", "fc2", "bias")
        x = x + f
        blocks.append(x), ffns.append(f)
    return np.stack(blocks), np.stack(ffns)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _block_params(enc):
    return jax.tree.map(
        lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(enc.blocks, nnx.Param))
    )


@pytest.mark.parametrize("scan", [True, False])
def test_trunk_collects_each_blocks_ffn_output_before_the_residual_add(scan):
    cfg = EncoderConfig(width=16, depth=2, heads=2, qkv_bias=True, drop_path=0.2, scan_layers=scan)
    enc = FrameAST(cfg, rngs=nnx.Rngs(params=3))
    # Non-zero biases and LayerNorm affines, so every parameter the reference uses matters.
    state = nnx.state(enc.blocks, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    nnx.update(
        enc.blocks,
        jax.tree.unflatten(
            treedef, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
        ),
    )
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 7, 16)).astype(np.float32)
    valid = np.ones((2, 7), bool)
    valid[1, 5:] = False
    want_blocks, want_ffn = _np_blocks(_block_params(enc), x.astype(np.float64), valid, 2)
    run = nnx.jit(lambda e, x, v, c: e.trunk(x, v, collect_layers=c), static_argnums=3)
    out_f, ffn = run(enc, jnp.asarray(x), jnp.asarray(valid), "ffn")
    out_b, blocks = run(enc, jnp.asarray(x), jnp.asarray(valid), "block")
    out_t, blocks_t = run(enc, jnp.asarray(x), jnp.asarray(valid), True)
    np.testing.assert_allclose(np.asarray(ffn), want_ffn, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(blocks), want_blocks, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(blocks_t), np.asarray(blocks))  # True = "block"
    np.testing.assert_array_equal(np.asarray(out_f), np.asarray(out_b))  # the same forward either way
    assert float(np.abs(want_ffn - want_blocks).max()) > 0.1  # the two sources differ
    # With drop-path active, the "ffn" path draws the same paths as the plain trunk (bit-identical output).
    train = nnx.jit(
        lambda e, x, v, c: e.trunk(x, v, train=True, key=jax.random.key(5), collect_layers=c),
        static_argnums=3,
    )
    plain = train(enc, jnp.asarray(x), jnp.asarray(valid), False)
    with_ffn, _ = train(enc, jnp.asarray(x), jnp.asarray(valid), "ffn")
    np.testing.assert_array_equal(np.asarray(with_ffn), np.asarray(plain))
    with pytest.raises(ValueError, match="collect_layers"):
        enc.trunk(jnp.asarray(x), collect_layers="attn")


def _np_targets(layers, k, eps_final):
    top = layers[-k:]
    mean = top.mean(2, keepdims=True)
    top = (top - mean) / np.sqrt(top.var(2, keepdims=True) + 1e-5)  # instance norm over the tokens
    y = top.mean(0)
    return (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps_final)


def _plain_config(**aasp):
    """The tiny test config without the AaPE branch (nothing here depends on it; it keeps the tests cheap)."""
    c = _config(**aasp)
    c.model.aape = None
    return c


def _init(method):
    return nnx.jit(lambda k: method.init(k))(jax.random.key(0))


def test_teacher_targets_are_eat_s_ffn_targets_by_default():
    # The pre-norm trunk (the NumPy reference's blocks); the post-norm one is checked in the next test.
    c = _plain_config()
    c.model.norm_style = "pre"
    method = Aasp(c)
    _, teacher, _ = _init(method)
    enc = teacher.encoder
    b, frames = 2, 96
    spec = jax.random.normal(jax.random.key(1), (b, 128, frames))
    length = jnp.full((b,), frames, jnp.int32)
    targets = lambda meth: nnx.jit(lambda t, s, n: meth.teacher_targets(t, s, n)[:2])  # noqa: E731
    y, utt = targets(method)(teacher, spec, length)
    x = np.asarray(enc.embed(spec, None, length), np.float64)
    want_blocks, want_ffn = _np_blocks(_block_params(enc), x, np.ones(x.shape[:2], bool), enc.cfg.heads)
    p = enc.n_prefix
    want = _np_targets(want_ffn[:, :, p:], c.model.depth, 1e-5)  # all (top 12, clipped) layers
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(utt), want.mean(1), rtol=2e-3, atol=2e-3)
    # target_source="block": the residual stream instead.
    block = _plain_config(target_source="block")
    block.model.norm_style = "pre"
    yb, _ = targets(Aasp(block))(teacher, spec, length)
    np.testing.assert_allclose(
        np.asarray(yb), _np_targets(want_blocks[:, :, p:], 2, 1e-5), rtol=2e-3, atol=2e-3
    )
    assert float(jnp.abs(yb - y).max()) > 0.1


def test_post_norm_trunk_gives_eat_s_t_targets_and_a_finite_step():
    """``model.norm_style="post"`` (EAT's trunk, AaSP's default; the block order itself is checked against a
    NumPy EAT reference in test_model.py): the teacher's "ffn" targets are built from EAT's ``t`` (the trunk's
    "ffn" stacks), and a loss + gradient step is finite, with gradients reaching the embedding LayerNorm."""
    for variant in ("tiny", "base", "xxl"):  # EAT's layout and front end in every variant
        v = load_config(f"{CONFIG}:{variant}")
        assert (v.model.norm_style, v.aasp.features, v.aasp.pad_is_signal, v.aasp.pad_value) == (
            "post", "kaldi_fbank128_16k", True, "zero"
        )  # fmt: skip
    c = _plain_config(num_masks=2)
    assert c.model.norm_style == "post"
    method = Aasp(c)
    method.check()
    # Built abstractly and filled from NumPy (an init compile costs more than this test's checks need).
    rng = np.random.default_rng(0)

    def fill(module):
        graphdef, state = nnx.split(module)
        pure = nnx.to_pure_dict(state)

        def draw(path, a):
            value = np.ones(a.shape) if path[-1].key == "scale" else 0.02 * rng.normal(size=a.shape)
            return value.astype(a.dtype)

        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, pure))
        return nnx.merge(graphdef, state)

    student, teacher = (fill(m) for m in nnx.eval_shape(lambda: method.init(jax.random.key(0)))[:2])
    assert "embed_norm" in nnx.state(student.encoder, nnx.Param) and "norm" not in nnx.state(teacher.encoder)
    spec = rng.normal(size=(2, 128, 96)).astype(np.float32)
    batch = {"spec": jnp.asarray(spec), "spec_length": jnp.full((2,), 96)}

    @nnx.jit
    def step(s, t, batch):
        y, utt = method.teacher_targets(t, batch["spec"], batch["spec_length"])[:2]
        _, ffn = t.encoder(batch["spec"], batch["spec_length"], collect_layers="ffn")

        def objective(s):
            total, metrics, _ = method.loss(s, t, {}, batch, jax.random.key(2), 0)
            return total, metrics

        (total, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(s)
        return y, utt, ffn, total, metrics, grads

    y, utt, ffn, total, metrics, grads = step(student, teacher, batch)
    p = teacher.encoder.n_prefix
    want = _np_targets(np.asarray(ffn, np.float64)[:, :, p:], c.model.depth, 1e-5)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(utt), want.mean(1), rtol=2e-3, atol=2e-3)
    assert np.isfinite(float(total)) and float(metrics["loss_reg"]) > 0 and float(metrics["loss_utt"]) > 0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["encoder"]["embed_norm"]["scale"][...]).max()) > 0


def _filled(method, seed=0):
    """The method's student and teacher built abstractly and filled from NumPy (LayerNorm scales 1, other
    parameters small normals): no init compile."""
    rng = np.random.default_rng(seed)

    def fill(module):
        graphdef, state = nnx.split(module)

        def draw(path, a):
            value = np.ones(a.shape) if path[-1].key == "scale" else 0.02 * rng.normal(size=a.shape)
            return value.astype(a.dtype)

        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
        return nnx.merge(graphdef, state)

    return tuple(fill(m) for m in nnx.eval_shape(lambda: method.init(jax.random.key(0)))[:2])


def test_a_short_clip_is_padded_as_eat_pads_by_default_and_masked_with_the_knob():
    """EAT zero-pads a short clip's raw log fbank to its 1024-frame target and attends to the padding (a 10 s
    AudioSet clip: 998 frames). By default (``pad_is_signal``, ``pad_value="zero"``) the frames past a clip's
    length hold the stored value 0 (model input: the feature set's offset, 4.268 / 9.138 ≈ 0.467) and the
    whole crop counts: the loss is that of a full-length clip holding that value there, whatever the pipeline
    padded with (its silence, ln(eps)). ``pad_value="data"`` keeps the pipeline's padding, still counted;
    ``pad_is_signal=False`` masks it by the length: the padded frames' values do not matter."""
    from atst_jax import features

    fs = features.get("kaldi_fbank128_16k")
    fill = fs.normalize(0.0)
    np.testing.assert_allclose(fill, 4.268 / (2 * 4.569), rtol=1e-6)

    def method(**knobs):
        c = _plain_config(num_masks=2, **knobs)
        c.model.depth = 1
        return Aasp(c)

    default, data, masked = method(), method(pad_value="data"), method(pad_is_signal=False)
    assert default.cfg.pad_is_signal and default.cfg.pad_value == "zero"
    student, teacher = _filled(default)
    rng = np.random.default_rng(1)
    spec = rng.normal(size=(2, 128, 96)).astype(np.float32)
    cut, full = np.array([96, 40], np.int32), np.array([96, 96], np.int32)

    def padded(value):
        out = spec.copy()
        out[1, :, 40:] = value
        return jnp.asarray(out)

    silence, other, eat = padded(fs.normalize(fs.silence)), padded(2.0), padded(fill)
    seen = default.official_padding({"spec": silence, "spec_length": jnp.asarray(cut)})
    np.testing.assert_array_equal(np.asarray(seen["spec"]), np.asarray(eat))
    np.testing.assert_array_equal(np.asarray(seen["spec_length"]), full)
    assert masked.official_padding(batch := {"spec": silence, "spec_length": cut}) is batch

    def losses(m, *batches):
        loss = nnx.jit(lambda s, t, b: m.loss(s, t, {}, b, jax.random.key(2), 0)[0])
        return [float(loss(student, teacher, {"spec": x, "spec_length": jnp.asarray(n)})) for x, n in batches]

    same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6)  # noqa: E731
    differ = lambda a, b: abs(a - b) > 1e-4 * abs(b)  # noqa: E731
    # Default: EAT's padding, attended and counted (the old masked behaviour fails the first equality).
    short, short_other, eat_full = losses(default, (silence, cut), (other, cut), (eat, full))
    same(short, eat_full), same(short_other, eat_full)
    # pad_value="data": the pipeline's padding as it came, counted.
    d_short, d_full, d_other = losses(data, (silence, cut), (silence, full), (other, cut))
    same(d_short, d_full)
    assert differ(d_short, d_other) and differ(d_short, short)
    # pad_is_signal=False: masked by the length (its values never reach the loss).
    m_short, m_other, m_eat_full = losses(masked, (silence, cut), (other, cut), (eat, full))
    same(m_short, m_other)
    assert differ(m_short, m_eat_full)


def test_loss_weights_frame_and_utterance_terms_as_eat():
    """EAT's reduction, written out for random errors: per GPU the frame errors summed × 1/√D plus cls_loss
    × that GPU's masked count × the CLS errors summed × 1/√D; gradients summed over GPUs and divided by the
    global masked count. That equals √D · (frame MSE + 12·16 · utterance MSE) — the default weighting."""
    rng = np.random.default_rng(0)
    gpus, clips, copies, masked, d = 4, 12, 16, 3, 8
    frame = rng.normal(size=(gpus, clips * copies, masked, d))  # prediction − target
    cls = rng.normal(size=(gpus, clips * copies, d))
    s_gpu = clips * copies * masked
    eat = sum(
        (frame[g] ** 2).sum() / np.sqrt(d) + s_gpu * (cls[g] ** 2).sum() / np.sqrt(d) for g in range(gpus)
    )
    eat /= gpus * s_gpu
    c = load_config(CONFIG + ":base")
    ours = np.sqrt(d) * ((frame**2).mean() + c.aasp.utterance_weight * (cls**2).mean())
    np.testing.assert_allclose(ours, eat, rtol=1e-12)

    # The method's total is that (plus the contrastive term, weighted relative to the regression).
    student, teacher, _ = _init(Aasp(_plain_config(num_masks=2)))
    batch = {"spec": jax.random.normal(jax.random.key(1), (2, 128, 96)), "spec_length": jnp.full((2,), 96)}
    for extra, scale in (({}, np.sqrt(128)), ({"loss_scale": 1 / 128}, 1.0)):
        method = Aasp(_plain_config(num_masks=2, **extra))
        loss = nnx.jit(lambda s, t, b, method=method: method.loss(s, t, {}, b, jax.random.key(2), 0))
        total, m, _ = loss(student, teacher, batch)
        want = scale * (m["loss_reg"] + 192.0 * m["loss_utt"] + 0.1 * m["loss_nce"])
        np.testing.assert_allclose(float(total), float(want), rtol=1e-5)
        assert float(m["loss_utt"]) > 0 and float(m["loss_nce"]) > 0


def _np_eat_mask(rng, grid, ratio, adjust, block):
    """EAT's inverse block mask from its stated rules (one copy): centres uniform with replacement, blocks
    around them cut at the edges, the union trimmed / filled by uniformly random tokens. Visible = True."""
    n_t, n_f = grid
    n = n_t * n_f
    keep = 1.0 - ratio
    vis = np.zeros(grid, bool)
    for c in rng.integers(0, n, int(n * ((keep + adjust) / (block[0] * block[1])))):
        t0, f0 = c // n_f - block[0] // 2, c % n_f - block[1] // 2
        vis[max(t0, 0) : t0 + block[0], max(f0, 0) : f0 + block[1]] = True
    flat = vis.reshape(-1)
    have, want = int(flat.sum()), int(n * keep)
    if have > want:
        flat[rng.choice(np.flatnonzero(flat), have - want, replace=False)] = False
    elif have < want:
        flat[rng.choice(np.flatnonzero(~flat), want - have, replace=False)] = True
    return vis


def _mask_stats(vis):
    """Per-mask statistics of visible grids ``[S, n_t, n_f]``: visible tokens with a visible 4-neighbour,
    isolated visible tokens, the per-frequency-row share, and the share in the first/last 2 time steps."""
    nb = np.zeros_like(vis)
    nb[:, 1:] |= vis[:, :-1]
    nb[:, :-1] |= vis[:, 1:]
    nb[:, :, 1:] |= vis[:, :, :-1]
    nb[:, :, :-1] |= vis[:, :, 1:]
    return {
        "clustered": (vis & nb).sum((1, 2)).astype(float),
        "isolated": (vis & ~nb).sum((1, 2)).astype(float),
        **{f"freq{j}": vis[:, :, j].sum(1).astype(float) for j in range(vis.shape[2])},
        "edge_time": (vis[:, :2].sum((1, 2)) + vis[:, -2:].sum((1, 2))).astype(float),
    }


def test_eat_inverse_block_mask_matches_an_independent_numpy_sampler():
    grid, ratio, adjust, block, s = (64, 8), 0.8, 0.07, (5, 5), 3000
    n = grid[0] * grid[1]
    assert views.eat_visible_count(n, ratio) == 102 and views.eat_block_centres(n, ratio, block, adjust) == 5
    vis, hid = jax.jit(lambda k: views.eat_inverse_block_mask(k, s, grid, ratio, block=block, adjust=adjust))(
        jax.random.key(0)
    )
    vis, hid = np.asarray(vis), np.asarray(hid)
    assert vis.shape == (s, 102) and hid.shape == (s, n - 102)
    assert all(
        len(set(v) | set(h)) == n for v, h in zip(vis[:50], hid[:50], strict=True)
    )  # complements, no repeats
    got = np.zeros((s, n), bool)
    np.put_along_axis(got, vis, True, axis=1)
    rng = np.random.default_rng(1)
    ref = np.stack([_np_eat_mask(rng, grid, ratio, adjust, block) for _ in range(s)])
    assert (ref.sum((1, 2)) == 102).all()
    a, b = _mask_stats(got.reshape(s, *grid)), _mask_stats(ref)
    old_vis, _ = views.inverse_block_mask(jax.random.key(2), s, grid, 102, block=block)
    old = np.zeros((s, n), bool)
    np.put_along_axis(old, np.asarray(old_vis), True, axis=1)
    o = _mask_stats(old.reshape(s, *grid))
    for k in a:
        se = np.sqrt((a[k].var() + b[k].var()) / s)
        assert abs(a[k].mean() - b[k].mean()) < 5 * se + 1e-9, (k, a[k].mean(), b[k].mean(), se)
    # The statistics tell the samplers apart: the earlier one keeps whole blocks and few isolated tokens.
    se = np.sqrt((o["isolated"].var() + b["isolated"].var()) / s)
    assert abs(o["isolated"].mean() - b["isolated"].mean()) > 20 * se


def test_eat_inverse_block_mask_with_padding_and_tiny_grids():
    grid = (16, 8)  # the tiny config's 256-frame crops: int(128 · 0.2) = 25 visible, 1 block centre
    n = 128
    assert views.eat_visible_count(n, 0.8) == 25 and views.eat_block_centres(n, 0.8) == 1
    valid = jnp.ones((64, n), bool).at[1, 40:].set(False)  # clip 1 has 40 real tokens (5 time steps)
    vis, hid = views.eat_inverse_block_mask(jax.random.key(0), 64, grid, 0.8, valid=valid)
    vis, hid = np.asarray(vis), np.asarray(hid)
    assert vis.shape == (64, 25) and hid.shape == (64, n - 25)
    for i in range(64):
        assert sorted(set(vis[i]) | set(hid[i])) == list(range(n))
    assert vis[1].max() < 40  # padding never visible while enough real tokens remain
    # One 5 × 5 block (cut at the edges) holds most of the 25: a visible core of ≥ 9 tokens in a 3 × 3 box.
    g = np.zeros((64, *grid), bool)
    for i in range(64):
        g[i].reshape(-1)[vis[i]] = True
    core = [max(g[i, t : t + 3, f : f + 3].sum() for t in range(14) for f in range(6)) for i in range(64)]
    assert np.mean(np.asarray(core) == 9) > 0.9
    # Different copies get different masks; the method's count is EAT's.
    assert len({tuple(v) for v in vis}) > 60
    assert Aasp(load_config(CONFIG + ":tiny")).num_visible() == 25
    assert Aasp(_config(mask_sampler="blocks")).num_visible() == 10  # the earlier rule: round(48 · 0.2)
