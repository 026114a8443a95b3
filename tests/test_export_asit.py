"""Export of 2-D patch encoders (ASiT) in the official ViT layout; the PyTorch ViT, its Kaldi front end,
HEAR and ``embed`` for those encoders.

One tiny ASiT run (width 64, depth 2, one 64-wide head; 592-frame crops, so the chunk length is the
positions' length as in the recipe) with randomly perturbed parameters — so a wrong transpose, a (time,
mel) swap of the patch conv, a q/k/v-bias mix-up or student/teacher confusion changes numbers — is written
as a real Orbax checkpoint once per module, and exported once; every test works from those.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import soundfile as sf  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import load_file as st_load_torch  # noqa: E402

from atst_jax import fbank, features, inference  # noqa: E402
from atst_jax.checkpoint import Checkpointer, read_checkpoint  # noqa: E402
from atst_jax.eval import embed  # noqa: E402
from atst_jax.export import __main__ as export_cli  # noqa: E402
from atst_jax.export import convert, hear, load, torch_vit  # noqa: E402
from atst_jax.methods import build  # noqa: E402
from atst_jax.models.encoder import EncoderConfig, FrameAST  # noqa: E402
from atst_jax.train import load_config  # noqa: E402

SR = 32000
WIDTH, DEPTH, HEADS = 64, 2, 1
N_MELS, PATCH, NUM_POS = 128, (16, 16), 297
CHUNK = 592  # 37 columns of 16 frames: the 296 positions of the official ViT
COLS = N_MELS // PATCH[1]  # 8 frequency patches per time column
CFG = EncoderConfig(
    width=WIDTH,
    depth=DEPTH,
    heads=HEADS,
    n_mels=N_MELS,
    stem="patch2d",
    patch_size=PATCH,
    num_pos=NUM_POS,
    use_cls=True,
    qkv_bias=True,
    pos_embed="learned",
    drop_path=0.0,
)


def _official_table(d: int, depth: int, num_pos: int = NUM_POS, mlp: int = 4) -> dict:
    """The official ``VisionTransformer(in_chans=1, audio_size=[592, 128], patch_size=[16, 16], qkv_bias=True)``
    ``state_dict``, written out from reading ASiT's vision_transformer.py: the module's own parameters
    (``cls_token``, ``pos_embed``) first, then ``patch_embed.proj`` (Conv2d), the blocks, ``norm``; ``head``
    is an identity."""
    table = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, num_pos, d),
        "patch_embed.proj.weight": (d, 1, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (mlp * d, d),
                b + "mlp.fc1.bias": (mlp * d,),
                b + "mlp.fc2.weight": (d, mlp * d),
                b + "mlp.fc2.bias": (d,),
            }
        )
    table.update({"norm.weight": (d,), "norm.bias": (d,)})
    return table


def _perturb(tree, rng, scale=0.05):
    return jax.tree.map(
        lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(np.float32), tree
    )


def _tiny_config(crop_frames: int = CHUNK):
    config = load_config("configs/asit.py:tiny")
    config.model.width, config.model.depth, config.model.heads = WIDTH, DEPTH, HEADS
    config.asit.crop_frames = crop_frames
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real ASiT run directory (one checkpoint, step 7) with perturbed student and teacher; returns
    ``(workdir, stored state, config)``."""
    config = _tiny_config()
    student, teacher, _ = build(config).init(jax.random.key(0))
    rng = np.random.default_rng(0)
    state = {
        "step": np.asarray(7, np.int32),
        "params": _perturb(nnx.to_pure_dict(nnx.state(student, nnx.Param)), rng),
        "teacher": _perturb(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), rng),
        "opt": {"count": np.asarray(7, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    workdir = tmp_path_factory.mktemp("asit_run")
    ckpt = Checkpointer(workdir, save_every=1, keep=3, async_save=False)
    ckpt.save(7, state, config=config, force=True)
    ckpt.close()
    _, saved_config, stored = read_checkpoint(workdir)
    return workdir, stored, saved_config


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """``{"teacher": path, "student": path}``: the run exported by the CLI."""
    out = tmp_path_factory.mktemp("asit_exports")
    paths = {}
    for enc in ("teacher", "student"):
        paths[enc] = out / f"{enc}.safetensors"
        argv = [
            "--workdir",
            str(run[0]),
            "--format",
            "safetensors",
            "--encoder",
            enc,
            "--out",
            str(paths[enc]),
        ]
        assert export_cli.main(argv) == 0
    return paths


@pytest.fixture(scope="module")
def jax_embedder(run):
    workdir, _, config = run
    encoder, step, _ = embed.read_run_encoder(workdir)
    assert step == 7 and encoder.cfg.stem == "patch2d" and encoder.cfg.qkv_bias
    return embed.Embedder(
        encoder,
        chunk_frames=inference.encoder_chunk_frames(encoder.cfg, config),
        features=inference.run_features(config, encoder.cfg),
    )


def _signal(seconds, seed, sr=SR):
    """A gliding tone over modulated noise with a DC offset: non-trivial, deterministic."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * (300 + 200 * np.sin(0.7 * t)) * t)
    wave += 0.1 * rng.standard_normal(t.shape) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    return (wave + 0.01).astype(np.float32)


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


def _without_mask(params):
    return {k: v for k, v in params.items() if k != "mask_embed"}


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------


def test_official_vit_layout_from_abstract_base_model():
    """ViT-B (768, 12 blocks, 12 heads) as ASiT configures it: the export's names, shapes and order are the
    official table (150 tensors, 85,482,240 parameters); our PyTorch ViT (meta device) has that state_dict."""
    config = load_config("configs/asit.py:base")
    cfg = EncoderConfig.from_config(config.model)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.stem, cfg.num_pos) == (768, 12, 12, "patch2d", NUM_POS)
    abstract = nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0)))
    sd = jax.eval_shape(
        lambda p: convert.vit_to_torch(p, cfg.patch_size), nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    )
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    table = _official_table(768, 12)
    assert shapes == table and list(table) == convert.vit_keys(12)  # (eval_shape sorts the dict keys)
    assert len(sd) == 150 and sum(int(np.prod(s)) for s in shapes.values()) == 85_482_240

    with torch.device("meta"):
        tm = torch_vit.VisionTransformer(audio_size=(592, 128), patch_size=(16, 16), in_chans=1)
    assert [(k, tuple(v.shape)) for k, v in tm.state_dict().items()] == list(table.items())


def test_round_trip_is_exact(run):
    """JAX → official layout → JAX gives the very same arrays (``mask_embed``, absent from the official
    layout, comes back as zeros), through ``torch_to_vit`` and through ``torch_to_encoder``'s dispatch."""
    params = run[1]["teacher"]["encoder"]
    sd = convert.as_contiguous(convert.vit_to_torch(params, PATCH))
    assert list(sd) == convert.vit_keys(DEPTH) and "mask_embed" not in sd
    assert {k: v.shape for k, v in sd.items()} == _official_table(WIDTH, DEPTH)
    for back in (convert.torch_to_vit(sd), convert.torch_to_encoder(sd)):
        _tree_equal(_without_mask(back), _without_mask(params))
        assert not back["mask_embed"].any() and back["mask_embed"].shape == (1, 1, WIDTH)
    # The bias rows follow the weight rows: [q; k; v], head-major.
    np.testing.assert_array_equal(
        sd["blocks.1.attn.qkv.bias"][WIDTH : 2 * WIDTH], params["blocks"]["attn"]["qkv"]["bias"][1, 1, 0]
    )
    with pytest.raises(KeyError, match="missing"):
        convert.torch_to_vit({k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.bias"})
    with pytest.raises(ValueError, match="qkv bias"):  # the ATST layout cannot hold the bias
        convert.encoder_to_torch(params)


def test_patch_conv_is_indexed_time_then_mel(run):
    """A single lit pixel at (frame 16·t + dt, mel 16·f + df) reaches token t·8 + f through conv weight
    ``[:, 0, dt, df]`` — the official ``[B, 1, time, mel]`` orientation."""
    params = run[1]["params"]["encoder"]
    tm = torch_vit.VisionTransformer.from_state_dict(
        convert.as_contiguous(convert.vit_to_torch(params, PATCH))
    )
    t, dt, f, df = 3, 5, 6, 11
    x = torch.zeros(1, 1, 64, N_MELS)
    x[0, 0, 16 * t + dt, 16 * f + df] = 1.0
    with torch.no_grad():
        tokens = tm.patch_embed(x)[0] - tm.patch_embed.proj.bias
    lit = (tokens.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert lit == [t * COLS + f]
    kernel = params["patch_embed"]["kernel"]  # JAX row dt·16 + df
    np.testing.assert_allclose(tokens[t * COLS + f].numpy(), kernel[dt * 16 + df], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Numerics: the PyTorch ViT vs the JAX encoder
# ----------------------------------------------------------------------------------------------------------


def test_torch_vit_matches_jax_on_592_and_padded_inputs(run, exports):
    """The exported teacher loads ``strict=True``; on a full 592-frame crop its official forward (no mask)
    gives the JAX encoder's tokens within 1e-4; with a zero-padded shorter clip and lengths, the valid CLS
    and patch tokens (and the last-n-blocks features) agree too."""
    _, state, _ = run
    jm = inference.encoder_from_params(state["teacher"]["encoder"], CFG)
    sd = st_load_torch(str(exports["teacher"]))
    tm = torch_vit.VisionTransformer(
        audio_size=(592, 128), patch_size=(16, 16), in_chans=1, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS
    )
    result = tm.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert tm.audio_size == torch_vit.VisionTransformer.from_state_dict(sd).audio_size == (592, 128)

    rng = np.random.default_rng(5)
    spec = rng.standard_normal((2, N_MELS, CHUNK)).astype(np.float32)  # JAX layout [B, mel, time]
    spec[1, :, 300:] = 0.0
    length = np.array([CHUNK, 300])
    x = torch.from_numpy(np.ascontiguousarray(spec.transpose(0, 2, 1)))[:, None]  # official [B, 1, time, mel]
    with jax.default_matmul_precision("highest"):
        full_j = np.asarray(jm(spec, length))
        feats_j = np.asarray(inference.block_features(jm, spec, length, DEPTH))
    with torch.no_grad():
        official = tm(x[:1]).numpy()  # no key mask: the official computation
        full_t = tm(x, torch.from_numpy(length)).numpy()
        feats_t = tm.block_outputs(x, torch.from_numpy(length), DEPTH).numpy()
    assert full_j.shape == full_t.shape == (2, 1 + 37 * COLS, WIDTH)
    assert np.abs(official[0] - full_j[0]).max() < 1e-4
    valid = 1 + (300 // 16) * COLS  # CLS + 18 whole columns
    assert np.abs(full_t[1, :valid] - full_j[1, :valid]).max() < 1e-4
    assert np.abs(feats_t[:, :valid] - feats_j[:, :valid]).max() < 1e-4
    assert np.abs(full_j[:, 0]).max() > 0.5  # not a degenerate comparison
    # Masking matters: the unmasked padded clip's CLS differs, and a clip cut to its columns matches.
    with torch.no_grad():
        unmasked = tm(x[1:])[0, 0].numpy()
        cut = tm(x[1:, :, : 300 // 16 * 16])[0].numpy()
    assert np.abs(unmasked - full_t[1, 0]).max() > 1e-3
    assert np.abs(cut - full_t[1, :valid]).max() < 1e-4


def test_torch_kaldi_fbank_matches_numpy():
    """The PyTorch front end equals ``atst_jax.fbank`` (≤ 1e-3 on log values; both float64 inside) and the
    ``kaldi_fbank128`` feature set's normalised model input."""
    wave = _signal(3.3, 1)
    fe = torch_vit.KaldiFbank(block_frames=77)
    got = fe.log_fbank(torch.from_numpy(wave)[None])[0].numpy()
    ref = fbank.fbank_np(wave, SR, N_MELS, subtract_waveform_mean=True)
    assert got.shape == ref.shape == (fbank.num_frames(len(wave)), N_MELS) == (328, N_MELS)
    assert np.abs(got - ref).max() < 1e-3
    fs = features.get("kaldi_fbank128")
    model_in = fe(torch.from_numpy(wave)[None])[0].numpy()
    assert np.abs(model_in.T - fs.normalize(fs.compute(wave))).max() < 1e-3
    assert np.abs(model_in.T - inference.front_end("kaldi_fbank128")(wave)).max() < 1e-3


# ----------------------------------------------------------------------------------------------------------
# Export CLI and loading
# ----------------------------------------------------------------------------------------------------------


def test_export_cli_official_layout_metadata_and_round_trip(run, exports):
    workdir, state, config = run
    for enc, key in (("teacher", "teacher"), ("student", "params")):
        sd = st_load_torch(str(exports[enc]))
        assert set(sd) == set(convert.vit_keys(DEPTH))  # (safetensors stores its own key order)
        assert {k: tuple(v.shape) for k, v in sd.items()} == _official_table(WIDTH, DEPTH)
        torch_vit.VisionTransformer.from_state_dict(sd, strict=True)
        got = load.load_encoder_params(exports[enc])
        _tree_equal(_without_mask(got), _without_mask(state[key]["encoder"]))
    t, s = (st_load_torch(str(exports[e])) for e in ("teacher", "student"))
    assert not torch.equal(t["blocks.0.attn.qkv.bias"], s["blocks.0.attn.qkv.bias"])

    meta = load.read_file(exports["teacher"])[1]["metadata"]
    assert meta["format"] == export_cli.VIT_FORMAT == "asit_encoder"
    assert meta["features"] == "kaldi_fbank128" and meta["chunk_frames"] == str(CHUNK)
    assert (meta["width"], meta["depth"], meta["heads"], meta["step"]) == (
        str(WIDTH),
        str(DEPTH),
        str(HEADS),
        "7",
    )
    assert meta["patch_size"] == "16,16" and meta["n_mels"] == "128" and meta["encoder"] == "teacher"
    f = load.read_encoder_file(exports["teacher"])
    assert f.vit and f.chunk_frames == CHUNK and f.features == "kaldi_fbank128" and f.heads == HEADS
    assert f.config() == inference.run_encoder_config(config, state["teacher"]["encoder"])
    # The chunk length never exceeds the longest crop the method trained on (tiny recipe: 256 frames).
    assert inference.encoder_chunk_frames(CFG, _tiny_config(256).to_dict()) == 256
    assert inference.encoder_chunk_frames(CFG) == CHUNK


@pytest.mark.parametrize("fmt", ["atst_sed", "lightning"])
def test_export_refuses_frameast_formats_in_one_line(run, tmp_path, capsys, fmt):
    argv = ["--workdir", str(run[0]), "--format", fmt, "--out", str(tmp_path / "x")]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "patch2d" in err and "safetensors" in err
    assert not (tmp_path / "x").exists()


def test_official_asit_checkpoint_is_read(run, tmp_path):
    """An official ASiT ``checkpoint.pth``: ``{"student": DDP state_dict (module.backbone.*, module.head.*),
    "teacher": backbone.* …, "args": Namespace, …}`` opens weights-only, teacher or student backbone."""
    _, state, _ = run
    t_sd = convert.vit_to_torch(state["teacher"]["encoder"], PATCH)
    s_sd = convert.vit_to_torch(state["params"]["encoder"], PATCH)
    tensors = lambda sd, prefix: {prefix + k: torch.tensor(np.asarray(v)) for k, v in sd.items()}
    head = {"head.mlp.0.weight": torch.zeros(8, WIDTH), "head.cls_layer.weight_g": torch.ones(16, 1)}
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": {**tensors(s_sd, "module.backbone."), **tensors(head, "module.")},
            "teacher": {**tensors(t_sd, "backbone."), **tensors(head, "")},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_base", num_frames=592, num_mel_bins=128, patch_size=16),
            "loss_cls": {"center": torch.zeros(1, 16)},
        },
        path,
    )
    for enc, key in (("teacher", "teacher"), ("student", "params")):
        f = load.read_encoder_file(path, enc)
        assert f.vit and f.features == "kaldi_fbank128" and f.chunk_frames == CHUNK
        assert list(f.sd) == convert.vit_keys(DEPTH)
        _tree_equal(_without_mask(f.params()), _without_mask(state[key]["encoder"]))
    model = hear.load_model(str(path))
    assert isinstance(model, torch_vit.ViTEmbedder) and model.chunk_frames == CHUNK
    # The Namespace is accepted only as that layout's ``args``: anywhere else the file stays refused.
    bad = tmp_path / "bad.pth"
    torch.save({"student": {}, "teacher": tensors(t_sd, "backbone."), "extra": argparse.Namespace(a=1)}, bad)
    with pytest.raises(ValueError, match="weights_only=True.*argparse.Namespace"):
        load.read_encoder_file(bad)


# ----------------------------------------------------------------------------------------------------------
# HEAR and embed
# ----------------------------------------------------------------------------------------------------------


def test_hear_api_and_jax_embeddings_agree(exports, jax_embedder):
    """32 kHz audio of 14 s: 1398 frames → 87 columns (timestamps ``160·c + 87.5`` ms), chunks of 592, 592
    and 214 frames (at most 592 frames and ``max_chunks`` chunks per call); timestamp embeddings = the mean of
    each column's 8 frequency patches; scene = ``[CLS ‖ mean]``, CLS weighted by each chunk's columns; the JAX
    embedder of the run gives the same numbers within 1e-4."""
    model = hear.load_model(str(exports["teacher"]), max_chunks=2)
    assert isinstance(model, torch_vit.ViTEmbedder)
    assert model.sample_rate == SR and model.chunk_frames == CHUNK
    n = DEPTH * WIDTH
    assert model.timestamp_embedding_size == n and model.scene_embedding_size == 2 * n
    seen = []
    model.encoder.patch_embed.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))

    waves = np.stack([_signal(14.0, 2), 0.5 * _signal(14.0, 3)])
    emb, ts = hear.get_timestamp_embeddings(torch.from_numpy(waves), model)
    frames = fbank.num_frames(waves.shape[1])
    assert frames == 1398 and emb.shape == (2, frames // 16, n) and ts.shape == (2, 87)
    np.testing.assert_array_equal(ts[0].numpy(), 160.0 * np.arange(87) + 87.5)
    assert max(s[2] for s in seen) <= CHUNK and max(s[0] for s in seen) <= 2 and sum(s[0] for s in seen) == 6
    scene = hear.get_scene_embeddings(torch.from_numpy(waves), model)
    assert scene.shape == (2, 2 * n)
    torch.testing.assert_close(scene[:, n:], emb.mean(dim=1))

    # Chunk by chunk with the encoder alone: columns = mean over frequency patches; CLS weighted by columns.
    spec = model.frontend(torch.from_numpy(waves[:1]))  # [1, frames, 128]
    cls, weight = 0.0, 0
    for k, (s, e) in enumerate(inference.chunk_bounds(frames, CHUNK, 16)):
        cut = (e - s) // 16 * 16
        with torch.no_grad():
            out = model.encoder.block_outputs(spec[:, None, s : s + cut], None, DEPTH)[0]
        cols = out[1:].reshape(-1, COLS, n).mean(dim=1)
        torch.testing.assert_close(emb[0, s // 16 : s // 16 + cols.shape[0]], cols, atol=1e-5, rtol=1e-5)
        cls, weight = cls + cols.shape[0] * out[0], weight + cols.shape[0]
        assert (k, s) != (2, 1184) or cut == 208  # the last chunk: 214 frames, 13 whole columns
    torch.testing.assert_close(scene[0, :n], cls / weight, atol=1e-5, rtol=1e-5)
    # One chunk: the encoder's single-chunk [CLS ‖ mean of patch tokens].
    short = torch.from_numpy(_signal(2.0, 4))[None]
    sp = model.frontend(short)
    one = model.encoder.scene_features(sp[:, None], torch.tensor([sp.shape[1]]), DEPTH)
    torch.testing.assert_close(hear.get_scene_embeddings(short, model), one, atol=1e-5, rtol=1e-5)

    ej, tj = jax_embedder.frame_embeddings(waves[0])
    assert ej.shape == (87, n) and np.abs(ej - emb[0].numpy()).max() < 1e-4
    np.testing.assert_array_equal(tj.astype(np.float32), ts[0].numpy())
    sj = jax_embedder.clip_embedding(waves[0])
    assert sj.shape == (2 * n,) and np.abs(sj - scene[0].numpy()).max() < 1e-4
    assert jax_embedder.max_frames_seen <= CHUNK and jax_embedder.sample_rate == SR
    with pytest.raises(ValueError, match="shorter than one"):
        model.timestamp_embeddings(torch.zeros(1, 4000))  # 11 frames: no whole 16-frame column


def test_an_export_of_eat_s_16k_front_end_embeds_at_16k_as_the_jax_embedder(run, tmp_path):
    """An encoder trained on EAT's front end (``kaldi_fbank128_16k``, AaSP's default) records it in its export
    (``inference.run_features``); HEAR's ViT embedder then computes that fbank — 16 kHz, bins up to 8 kHz,
    ``(x + 4.268) / (2 · 4.569)`` — and equals the JAX embedder of the same file within 1e-4 (timestamps,
    frames, scene); X-ARES' ViT encoder takes 16 kHz audio."""
    from atst_jax.export import xares

    workdir, state, config = run
    eat = "kaldi_fbank128_16k"
    out = tmp_path / "eat.safetensors"
    trained_on_eat = dict(config, asit=dict(config["asit"], features=eat))
    export_cli._export_vit(trained_on_eat, state, 7, "safetensors", out, "teacher")
    f = load.read_encoder_file(out)
    assert f.features == eat and f.chunk_frames == CHUNK
    model = hear.load_model(str(out), max_chunks=2)
    assert isinstance(model, torch_vit.ViTEmbedder) and model.sample_rate == 16000
    wave = _signal(7.0, 5, sr=16000)  # 698 frames: chunks of 592 and 106 frames
    fs = features.get(eat)
    model_in = model.frontend(torch.from_numpy(wave)[None])[0].numpy()
    assert model_in.shape == (fs.num_frames(len(wave)), N_MELS) == (698, N_MELS)
    assert np.abs(model_in.T - fs.normalize(fs.compute(wave))).max() < 1e-3
    emb, ts = hear.get_timestamp_embeddings(torch.from_numpy(wave)[None], model)
    scene = hear.get_scene_embeddings(torch.from_numpy(wave)[None], model)
    jax_model = embed.Embedder(f.jax_encoder(), chunk_frames=f.chunk_frames, features=f.features)
    assert jax_model.sample_rate == 16000
    ej, tj = jax_model.frame_embeddings(wave)
    assert ej.shape == tuple(emb.shape[1:]) == (698 // 16, DEPTH * WIDTH)
    assert np.abs(ej - emb[0].numpy()).max() < 1e-4
    np.testing.assert_array_equal(tj.astype(np.float32), ts[0].numpy())
    assert np.abs(jax_model.clip_embedding(wave) - scene[0].numpy()).max() < 1e-4
    encoder = xares.ViTEncoder(out)
    assert encoder.sampling_rate == 16000 and encoder.hop_size_in_ms == 160.0


def test_embed_cli_for_asit_runs_and_exports(run, exports, jax_embedder, tmp_path):
    workdir, _, _ = run
    wav = tmp_path / "a.wav"
    sf.write(wav, _signal(7.0, 5, sr=16000), 16000, subtype="PCM_16")  # resampled to 32 kHz on reading
    from atst_jax import audio

    wave = audio.load_audio(wav, SR)
    out = tmp_path / "frames"
    assert embed.main(["--workdir", str(workdir), "--audio", str(wav), "--out", str(out)]) == 0
    ref, ref_ts = jax_embedder.frame_embeddings(wave)
    assert ref.shape == (fbank.num_frames(len(wave)) // 16, DEPTH * WIDTH)
    np.testing.assert_allclose(np.load(out / "a.npy"), ref, atol=1e-6)
    np.testing.assert_array_equal(np.load(out / "a.timestamps.npy"), ref_ts)

    argv = ["--audio", str(wav), "--level", "clip", "--layers", "1", "--encoder", "student"]
    assert embed.main(["--workdir", str(workdir), "--out", str(tmp_path / "r"), *argv]) == 0
    assert embed.main(["--weights", str(exports["student"]), "--out", str(tmp_path / "w"), *argv]) == 0
    got = np.load(tmp_path / "w" / "a.npy")
    assert got.shape == (2 * WIDTH,)
    np.testing.assert_allclose(got, np.load(tmp_path / "r" / "a.npy"), atol=1e-6)
