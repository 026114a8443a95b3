"""AaPE (models/aape.py): the SBLU's magnitude response peaks at its ω, ∂/∂ω is finite and non-zero over the
whole alias-prone band (and matches finite differences), the lambda encoder keeps (α, ω) in range, and with
the fusion projection at zero the stem is exactly the plain patch embedding (frame 64×4 on the 64-bin log-mel,
2-D 16×16 on the 128-bin fbank). The student's AaPE sees only its visible tokens: content under a mask (or a
dropped token) leaves the visible tokens bit-identical; without a mask the features are those recorded
before the mask existed."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atst_jax.models.aape import AapeConfig, alias_band, sblu
from atst_jax.models.encoder import EncoderConfig, FrameAST


def _response(omega, alpha=0.04, taps=65, thetas=None, frames=400):
    """|y| of the SBLU for unit cosines at each θ (steady state, away from the zero-padded edges)."""
    n = np.arange(frames)
    u = jnp.asarray(np.cos(np.outer(thetas, n)), jnp.float32)[:, None, :]  # [θ, S=1, T]
    one = jnp.ones((len(thetas), 1, 1), jnp.float32)
    re, im = sblu(u, alpha * one, omega * one, one, one, taps=taps)
    mag = jnp.sqrt(re**2 + im**2)[:, 0, 0, taps : frames - taps]
    # For a cosine input y[n] = H(θ)·cos(θn): the peak of |y| over n is |H(θ)|.
    return np.asarray(jnp.max(mag, axis=-1))


@pytest.mark.parametrize("stride", [4, 16])
def test_sblu_magnitude_response_peaks_at_omega(stride):
    lo, hi = alias_band(stride)
    thetas = np.linspace(0.01, math.pi, 315)
    for frac in (0.15, 0.5, 0.9):
        omega = lo + frac * (hi - lo)
        resp = _response(omega, thetas=thetas)
        peak = thetas[np.argmax(resp)]
        assert abs(peak - omega) < 0.03, (stride, omega, peak)
        # A real band-pass: far from ω (and from the band) it passes much less.
        far = np.abs(thetas - omega) > 0.5
        assert resp[far].max() < 0.3 * resp.max(), (omega, resp[far].max(), resp.max())


def test_gradient_wrt_omega_is_finite_and_nonzero_across_the_alias_band():
    stride = 4
    lo, hi = alias_band(stride)
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.float32)  # [B, S, T] noise envelopes
    readout = jnp.asarray(rng.normal(size=(2, 3, 1, 128)), jnp.float32)
    one = jnp.ones((2, 3, 1), jnp.float32)

    def loss(w):
        re, im = sblu(u, 0.1 * one, w * one, one, one, taps=33)
        return jnp.sum(readout * re) + 0.5 * jnp.sum(jnp.sqrt(re**2 + im**2))

    grad = jax.jit(jax.grad(loss))
    omegas = np.linspace(lo + 1e-3, hi, 24)  # (π/P, π], π included
    eps = 1e-3
    for w in omegas:
        g = float(grad(jnp.float32(w)))
        fd = float(loss(jnp.float32(w + eps)) - loss(jnp.float32(w - eps))) / (2 * eps)
        assert np.isfinite(g) and abs(g) > 1e-2, (w, g)
        np.testing.assert_allclose(g, fd, rtol=0.05, atol=0.05)


def _encoders(stem, n_mels, aape, seed=0):
    common = dict(width=64, depth=1, heads=2, n_mels=n_mels, drop_path=0.0, num_pos=65)
    if stem == "patch2d":
        common.update(stem="patch2d", patch_size=(16, 16), use_cls=True, pos_embed="sincos2d", qkv_bias=True)
    plain = FrameAST(EncoderConfig(**common), rngs=nnx.Rngs(params=seed))
    fused = FrameAST(EncoderConfig(**common, aape=aape), rngs=nnx.Rngs(params=seed))
    return plain, fused


@pytest.mark.parametrize("stem,n_mels,bins", [("frame", 64, 8), ("patch2d", 128, 16)])
def test_zero_fusion_is_exactly_the_plain_patch_embedding(stem, n_mels, bins):
    aape = AapeConfig(subband_bins=bins, kernels=3, taps=17)
    plain, fused = _encoders(stem, n_mels, aape)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, n_mels, 128)), jnp.float32)
    length = jnp.array([128, 100], jnp.int32)
    mask = jnp.zeros((2, plain.num_tokens(128)), bool).at[:, 1].set(True)
    np.testing.assert_array_equal(np.asarray(fused.embed(x, mask)), np.asarray(plain.embed(x, mask)))
    np.testing.assert_array_equal(np.asarray(fused(x, length)), np.asarray(plain(x, length)))

    # The branch is live: its features depend on the input, and the loss has a gradient on the zero fusion
    # (so training moves it off zero); once it is non-zero, the stem's output changes.
    feats = fused.aape.token_features(x)
    assert feats.shape == (2, plain.num_tokens(128), (n_mels // bins if stem == "frame" else 1) * 3 * 2)
    assert float(jnp.std(feats)) > 1e-3
    graphdef, params = nnx.split(fused)

    def loss(p):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p).embed(x)))

    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(g["aape"]["fuse"]["kernel"].get_value()).max()) > 1e-4
    fused.aape.fuse.kernel[...] = 0.05 * jax.random.normal(jax.random.key(3), fused.aape.fuse.kernel.shape)
    assert float(jnp.abs(fused.embed(x) - plain.embed(x)).max()) > 1e-3

    # Padding-invariant, as the trunk is: clip 1 (100 valid frames) gives the same valid tokens padded to 128
    # frames as cut to its own 100 (AaPE's statistics, modulation spectrum and SBLU stop at the valid frames).
    per = 4 if stem == "frame" else 16
    keep = fused.token_lengths(length)[1]
    cut = 100 - 100 % per
    alone = fused(x[1:, :, :cut], length[1:])[:, : fused.n_prefix + keep]
    padded = fused(x, length)[1:, : fused.n_prefix + keep]
    np.testing.assert_allclose(np.asarray(padded), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_lambda_encoder_keeps_alpha_positive_and_omega_in_the_alias_band():
    plain, fused = _encoders("patch2d", 128, AapeConfig(kernels=4))
    del plain
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 128, 96)) * 3, jnp.float32)
    alpha, omega = fused.aape.lambdas(fused.aape.envelopes(x))
    lo, hi = alias_band(16)
    assert alpha.shape == omega.shape == (3, 8, 4)
    assert float(alpha.min()) > 0
    assert float(omega.min()) > lo and float(omega.max()) <= hi
    # At init the kernels start spread over the band, α near alpha_init.
    np.testing.assert_allclose(np.asarray(alpha).mean(), 0.1, rtol=0.3)
    spread = np.sort(np.asarray(omega)[0, 0])
    assert spread[0] < lo + 0.3 * (hi - lo) and spread[-1] > lo + 0.7 * (hi - lo)
    # And they depend on the input (the lambda encoder reads the modulation spectrum).
    _, omega2 = fused.aape.lambdas(fused.aape.envelopes(jnp.roll(x, 7, axis=0) * 0.5 + jnp.sin(x)))
    assert float(jnp.abs(omega2 - omega).max()) > 1e-5


def test_atst_frame_aape_cli_learns_and_exports(tmp_path, embedded_cache):
    """ATST-Frame's recipe with the AaPE frame stem trains through the CLI like the others: 100 steps (cut for
    the suite: batch 8, 2 s crops, 2 blocks) with checkpoints at 20 and 100, the loss falls and the collapse
    monitors stay well above 0; the AaPE branch is in both networks (the teacher's EMA covers it) and its
    fusion projection has left zero. One run for the CLI, learning, export and embed checks."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    from atst_jax.checkpoint import read_checkpoint

    proc = subprocess.run(
        [sys.executable, "-m", "atst_jax.train", "--config", str(ROOT / "configs" / "atst_frame_aape.py") + ":tiny",
         "--workdir", str(tmp_path), "--config.train.steps=100", "--config.train.ckpt_every=20",
         "--config.train.keep_every=20", "--config.train.global_batch=8", "--config.model.depth=2",
         f"--config.data.cache_dir={embedded_cache}", "--config.data.num_clips=64",
         "--config.atst_frame.crop_seconds=2.0"],
        capture_output=True, text=True, env=cli_env(1, optimized=True), cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "20").is_dir() and (tmp_path / "checkpoints" / "100").is_dir()
    assert "std_frm_tea" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    early = float(np.mean([r["loss"] for r in rows[:2]]))
    late = float(np.mean([r["loss"] for r in rows[-3:]]))
    assert late < early - 0.1, (early, late)
    for r in rows:  # healthy ≈ 1/√128 ≈ 0.09 for the 128-d tiny heads; collapse → 0
        assert r["std_frm_tea"] > 0.02 and r["std_frm_stu"] > 0.02, r
    _, config, state = read_checkpoint(tmp_path)
    assert config["model"]["aape"]["subband_bins"] == 8
    fuse = state["params"]["encoder"]["aape"]["fuse"]["kernel"]
    assert fuse.shape == (8 * 2 * 2, 128) and np.abs(fuse).max() > 0
    assert "aape" in state["teacher"]["encoder"]

    # Export: FrameAST's keys + aape.*, our PyTorch AaPE-FrameAST loads it strict=True and matches JAX;
    # HEAR loads it; the official-loader formats refuse an encoder they cannot hold.
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from atst_jax.export import __main__ as export_cli
    from atst_jax.export import hear
    from atst_jax.export.torch_aape import AaPEFrameAST
    from atst_jax.inference import encoder_from_params, run_encoder_config

    out = tmp_path / "frame_aape.safetensors"
    assert export_cli.main(["--workdir", str(tmp_path), "--format", "safetensors", "--out", str(out)]) == 0
    assert (
        export_cli.main(["--workdir", str(tmp_path), "--format", "atst_sed", "--out", str(tmp_path / "x.pt")])
        == 2
    )
    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "atst_frame_encoder+aape"
    sd = load_file(str(out))
    assert len(sd) == 6 + 11 * 2 + 11  # FrameAST's 6 + 11 per block (2 here), + 11 aape.*
    model = AaPEFrameAST.from_state_dict(sd, json.loads(meta["aape"]), heads=2, strict=True).eval()
    enc = state["teacher"]["encoder"]
    jax_enc = encoder_from_params(enc, run_encoder_config(config, enc))
    x = np.random.default_rng(0).normal(size=(2, 64, 200)).astype(np.float32)
    length = np.array([200, 200], np.int32)
    want = np.asarray(jax_enc(x, length))
    with torch.no_grad():
        got = model(torch.from_numpy(x), torch.from_numpy(length)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    h = hear.load_model(str(out))
    wave = np.random.default_rng(1).normal(size=(1, 16000 * 2)).astype(np.float32) * 0.1
    emb, ts = hear.get_timestamp_embeddings(torch.from_numpy(wave), h)
    assert emb.shape == (1, ts.shape[1], h.timestamp_embedding_size) and np.isfinite(emb.numpy()).all()
    # The JAX embedder on the run gives what HEAR gives on the export.
    from atst_jax.eval.embed import Embedder, read_run_encoder

    frames, _ = Embedder(read_run_encoder(tmp_path)[0]).frame_embeddings(wave[0])
    np.testing.assert_allclose(frames, emb[0].numpy(), atol=2e-4, rtol=2e-4)
    # The export loads back as JAX parameters, AaPE branch included (what init_from reads).
    from atst_jax.export.load import load_encoder_params

    back = load_encoder_params(out, heads=2)
    flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert flat(back).keys() == flat(enc).keys() and "['aape']['fuse']['kernel']" in flat(back)
    for key, value in flat(enc).items():
        np.testing.assert_allclose(flat(back)[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_bad_subband_bins_is_a_one_line_config_error():
    from conftest import ROOT

    from atst_jax import methods
    from atst_jax.sharding import ConfigError
    from atst_jax.train import load_config

    c = load_config(str(ROOT / "configs" / "atst_frame_aape.py") + ":tiny")
    c.model.aape.subband_bins = 7
    with pytest.raises(ConfigError, match="subband_bins=7 must divide n_mels=64") as e:
        methods.build(c)
    assert "\n" not in str(e.value)


# --- what the student's AaPE sees ---------------------------------------------------------------------------
def _live_encoder(stem, aape=True):
    """A tiny encoder whose AaPE fusion is random, not its zero init (with ``fuse`` at zero the branch adds
    nothing, and a leak through it could not show)."""
    n_mels, bins = (64, 8) if stem == "frame" else (128, 16)
    common = dict(width=64, depth=1, heads=2, n_mels=n_mels, drop_path=0.0, num_pos=65)
    if stem == "patch2d":
        common.update(stem="patch2d", patch_size=(16, 16), use_cls=True, pos_embed="sincos2d", qkv_bias=True)
    if aape:
        common["aape"] = AapeConfig(subband_bins=bins, kernels=3, taps=17)
    enc = FrameAST(EncoderConfig(**common), rngs=nnx.Rngs(params=0))
    if aape:
        enc.aape.fuse.kernel[...] = jax.random.normal(jax.random.key(5), enc.aape.fuse.kernel.shape)
    return enc


def _under(enc, hidden, spec, fill):
    """``spec`` with every pixel of the tokens ``hidden [B, N]`` replaced by ``fill`` (same shape as spec)."""
    pixels = enc.unpatchify(jnp.broadcast_to(hidden[..., None], (*hidden.shape, enc.stem.patch_dim)))
    return jnp.where(pixels.astype(bool), fill, spec)


def _fills(spec, seed):
    """Replacement contents: other random values, a huge finite value, inf and nan."""
    other = jnp.asarray(np.random.default_rng(seed).normal(size=spec.shape) * 5, jnp.float32)
    return {"random": other, "huge": jnp.full_like(spec, 3e30), "inf": jnp.full_like(spec, jnp.inf),
            "nan": jnp.full_like(spec, jnp.nan)}  # fmt: skip


@pytest.mark.parametrize("stem", ["frame", "patch2d"])
def test_masked_content_does_not_reach_the_students_visible_tokens(stem):
    """A student's visible tokens are a function of the visible pixels only: replacing everything under the
    mask (and past the valid frames) by other values, a huge value, inf or nan leaves every visible token of
    the stem's output bit-identical, through the mask-token path (``embed``) and through the dropped-token
    path (``embed_visible``, each copy hidden its own tokens). Before the fix the AaPE branch ran on the
    unmasked crop and its filter and statistics carried masked content into the neighbours."""
    enc = _live_encoder(stem)
    b, frames = 3, 128
    n = enc.num_tokens(frames)
    spec = jnp.asarray(np.random.default_rng(0).normal(size=(b, enc.cfg.n_mels, frames)), jnp.float32)
    length = jnp.array([128, 100, 71], jnp.int32)
    valid = jnp.arange(n)[None] < enc.token_lengths(length)[:, None]
    mask = jnp.asarray(np.random.default_rng(1).random((b, n)) < 0.5) & valid
    hidden = mask | ~valid  # what the student does not see: masked tokens and padding
    p = enc.n_prefix

    embed = nnx.jit(lambda e, x: e.embed(x, mask, length))
    want = np.asarray(embed(enc, spec))[:, p:][np.asarray(~hidden)]
    for name, fill in _fills(spec, 2).items():
        got = np.asarray(embed(enc, _under(enc, hidden, spec, fill)))[:, p:][np.asarray(~hidden)]
        assert np.array_equal(got, want), (name, np.nanmax(np.abs(got - want)))
    # The branch is live (the test could fail): the visible tokens do depend on the visible pixels.
    moved = np.asarray(embed(enc, _under(enc, ~hidden, spec, 0.0)))[:, p:][np.asarray(~hidden)]
    assert np.abs(moved - want).max() > 1e-3

    # Dropped tokens: M = 2 copies per clip, each keeping its own 40 % of the tokens (padding last).
    m, v = 2, int(0.4 * n)
    keys = jax.random.uniform(jax.random.key(4), (b, m, n)) + 2.0 * (~valid)[:, None]
    vis = jnp.argsort(keys, axis=-1)[..., :v].astype(jnp.int32)  # [B, M, V]
    kept_valid = jnp.take_along_axis(jnp.repeat(valid, m, 0), vis.reshape(b * m, v), axis=1)
    embed_visible = nnx.jit(lambda e, x: e.embed_visible(x, length, vis))
    base = np.asarray(embed_visible(enc, spec))
    for j in range(m):
        seen = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], vis[:, j]].set(True) & valid
        # huge, not inf / nan: the one-hot gather multiplies every token by 0 or 1, and 0 · inf is nan.
        for name in ("random", "huge"):
            got = np.asarray(embed_visible(enc, _under(enc, ~seen, spec, _fills(spec, 3 + j)[name])))
            rows = np.arange(b) * m + j
            ok = np.asarray(kept_valid.reshape(b, m, v)[:, j])  # padding a copy had to keep is not visible
            assert np.array_equal(got[rows, :p], base[rows, :p])
            assert np.array_equal(got[rows, p:][ok], base[rows, p:][ok]), (name, j)
            if name == "random":  # the other copy sees some of those pixels
                other = np.arange(b) * m + (1 - j)
                assert np.abs(got[other] - base[other]).max() > 1e-3

    # It is ``embed`` with each copy's complement as the mask, at the kept tokens; padding is that same rule
    # (a mask over a clip's tail equals a shorter ``length``).
    rows = vis.reshape(b * m, v)
    comp = ~jnp.any(rows[:, :, None] == jnp.arange(n), axis=1)
    full = nnx.jit(lambda e: e.embed(jnp.repeat(spec, m, 0), comp, jnp.repeat(length, m, 0))[:, p:])(enc)
    np.testing.assert_allclose(
        base[:, p:], jnp.take_along_axis(full, rows[..., None], 1), rtol=1e-5, atol=3e-5
    )
    tail = jnp.broadcast_to(~valid[1], (1, n))
    both = nnx.jit(lambda e, x: (e.aape(x, mask=tail), e.aape(x, length[1:2])))
    by_mask, by_length = both(enc, spec[1:2])
    np.testing.assert_allclose(np.asarray(by_mask), np.asarray(by_length), rtol=1e-5, atol=1e-5)


def test_without_aape_embed_visible_is_the_embedding_gathered_per_copy():
    """No AaPE: ``embed_visible`` is exactly what the multi-mask methods did before (embed each clip once,
    gather each copy's tokens, the CLS token in front of every copy)."""
    from atst_jax.data import views

    enc = _live_encoder("patch2d", aape=False)
    spec = jnp.asarray(np.random.default_rng(0).normal(size=(2, 128, 96)), jnp.float32)
    length = jnp.array([96, 70], jnp.int32)
    vis = jax.random.randint(jax.random.key(0), (2, 3, 5), 0, enc.num_tokens(96))
    x = enc.embed(spec, length=length)
    want = views.take_tokens(x[:, 1:], vis.reshape(2, 15)).reshape(6, 5, -1)
    want = jnp.concatenate([jnp.repeat(x[:, :1], 3, axis=0), want], axis=1)
    assert np.array_equal(np.asarray(enc.embed_visible(spec, length, vis)), np.asarray(want))


def test_unmasked_features_match_a_fixed_reference():
    """Without a mask the branch computes what it computed before the mask was added (values recorded from
    that version: random fusion, two clips, the second padded from 100 of 128 frames)."""
    want = {
        "frame": ([[-5.684062, 9.601398, 10.019964, -7.2538733], [-11.566414, 9.55445, 17.293587, -1.3176384],
                   [-7.4520783, 10.013242, 18.94433, -5.108952]], 24214.064453125),
        "patch2d": ([[3.1531992, -4.6236777, 1.4429548, -1.7697835], [3.1780136, -4.4858184, 2.5685635,
                     -0.85333323], [2.8917298, -4.8253784, 2.164935, -0.6062756]], 14738.263671875),
    }  # fmt: skip
    for stem, (rows, total) in want.items():
        enc = _live_encoder(stem)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, enc.cfg.n_mels, 128)), jnp.float32)
        got = np.asarray(nnx.jit(lambda e, x: e.aape(x, jnp.array([128, 100], jnp.int32)))(enc, x))
        np.testing.assert_allclose(got[1, [0, 3, 5], :4], rows, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.abs(got).sum(), total, rtol=1e-5)
