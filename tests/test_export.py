"""PyTorch export, import, HEAR API and JAX embeddings (issue 6; contract: spec/torch_export.md).

A tiny ATST-Frame (width 64, depth 2, 1 head of 64) with randomly perturbed parameters — so that a wrong
transpose, a swapped q/k/v or head order, or student/teacher mix-up changes numbers — is written as a real
Orbax checkpoint once per module; every test works from it.
"""

from __future__ import annotations

import argparse
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import soundfile as sf  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import load_file as st_load_torch  # noqa: E402

from atst_jax import audio, embed  # noqa: E402
from atst_jax.checkpoint import Checkpointer, read_checkpoint  # noqa: E402
from atst_jax.export import __main__ as export_cli  # noqa: E402
from atst_jax.export import convert, hear, load, torch_encoder  # noqa: E402
from atst_jax.methods import atst_frame  # noqa: E402
from atst_jax.models.encoder import EncoderConfig, FrameAST  # noqa: E402
from atst_jax.train import encoder_config, load_config  # noqa: E402

SR = 16000
WIDTH, DEPTH, HEADS = 64, 2, 1
TINY_KEYS = 11 * DEPTH + 6


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


def _perturb(tree, rng, scale=0.05):
    return jax.tree.map(
        lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(np.float32), tree
    )


def _random_stats(stats, rng):
    def one(path, x):
        name = path[-1].key
        if name == "num_batches_tracked":
            return np.asarray(rng.integers(1, 1000), np.int32)
        if name == "running_var":
            return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        return rng.standard_normal(x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, stats)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with one checkpoint (step 5) of a tiny model; returns (workdir, state)."""
    config = load_config("configs/atst_frame.py:tiny")
    config.model.width, config.model.depth, config.model.heads = WIDTH, DEPTH, HEADS
    config.atst_frame.proj_hidden, config.atst_frame.proj_dim = 32, 16
    student, teacher, _ = atst_frame.init(
        jax.random.key(0), encoder_config(config), atst_frame.method_config(config)
    )
    rng = np.random.default_rng(0)
    state = {
        "step": np.asarray(5, np.int32),
        "params": _perturb(nnx.to_pure_dict(nnx.state(student, nnx.Param)), rng),
        "stats": _random_stats(nnx.to_pure_dict(nnx.state(student, nnx.BatchStat)), rng),
        "teacher": _perturb(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), rng),
        "teacher_stats": _random_stats(nnx.to_pure_dict(nnx.state(teacher, nnx.BatchStat)), rng),
        "opt": {"count": np.asarray(5, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    workdir = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(workdir, save_every=1, keep=3, async_save=False)
    ckpt.save(5, state, config=config, force=True)
    ckpt.close()
    _, _, stored = read_checkpoint(workdir)
    return workdir, stored


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """All formats for both encoders: ``{(format, encoder): path}``."""
    workdir, _ = run
    out = tmp_path_factory.mktemp("exports")
    paths = {}
    for fmt, suffix in (("safetensors", "safetensors"), ("atst_sed", "pt"), ("lightning", "ckpt")):
        for enc in ("teacher", "student") if fmt != "lightning" else ("teacher",):
            path = out / f"{fmt}_{enc}.{suffix}"
            assert (
                export_cli.main(
                    ["--workdir", str(workdir), "--format", fmt, "--encoder", enc, "--out", str(path)]
                )
                == 0
            )
            paths[fmt, enc] = path
    return paths


def _random_encoder_params(cfg: EncoderConfig, seed: int):
    """Random NumPy params in the encoder's layout, shaped by an abstract model (no eager JAX init)."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), abstract)


def _signal(seconds, seed):
    """Tones with a moving pitch over modulated noise, some silence: a non-trivial, deterministic clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * (300 + 200 * np.sin(0.7 * t)) * t)
    wave += 0.1 * rng.standard_normal(t.shape) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    wave[(t % 7.0) > 6.2] *= 0.01
    return wave.astype(np.float32)


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------


def _spec_table(d, depth=12):
    """spec/torch_export.md's ATST-Frame table, written out."""
    table = {
        "mask_embed": (1, 1, d),
        "pos_embed": (1, 251, d),
        "patch_embed.patch_embed.weight": (d, 256),
        "patch_embed.patch_embed.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (4 * d, d),
                b + "mlp.fc1.bias": (4 * d,),
                b + "mlp.fc2.weight": (d, 4 * d),
                b + "mlp.fc2.bias": (d,),
            }
        )
    table.update({"norm_frame.weight": (d,), "norm_frame.bias": (d,)})
    return table


@pytest.mark.parametrize("width,heads,total", [(768, 12, 85_419_264), (384, 6, 21_475_968)])
def test_official_key_table_from_abstract_model(width, heads, total):
    """Base/small key names and shapes, from an abstract (never allocated) model, equal the spec table;
    the PyTorch module (on the meta device) has the same state_dict."""
    cfg = EncoderConfig(width=width, depth=12, heads=heads)
    student = nnx.eval_shape(lambda: atst_frame.Student(cfg, atst_frame.AtstFrameConfig(), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(student, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(student, nnx.BatchStat))
    sd = jax.eval_shape(convert.encoder_to_torch, params["encoder"])
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(shapes) == 138
    assert shapes == _spec_table(width)
    assert sum(int(np.prod(s)) for s in shapes.values()) == total

    with torch.device("meta"):
        tm = torch_encoder.FrameAST(width=width, depth=12, heads=heads)
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == shapes
    assert list(tm.state_dict()) == convert.encoder_keys(12)  # official state_dict order

    with warnings.catch_warnings():  # int64 num_batches_tracked is int32 under jax's default x32
        warnings.simplefilter("ignore")
        heads_sd = jax.eval_shape(lambda p, s: convert.network_to_torch(p, s), params, stats)
    head_shapes = {k: tuple(v.shape) for k, v in heads_sd.items() if not k.startswith("encoder.")}
    bn = {
        f"{h}.1.{n}": (4096,)
        for h in ("projector", "predictor")
        for n in ("weight", "bias", "running_mean", "running_var")
    }
    assert head_shapes == {
        "projector.0.weight": (4096, width),
        "projector.3.weight": (256, 4096),
        "predictor.0.weight": (4096, 256),
        "predictor.3.weight": (256, 4096),
        "projector.1.num_batches_tracked": (),
        "predictor.1.num_batches_tracked": (),
        **bn,
    }


def test_clip_layout_139_keys():
    """ATST-Clip: ``cls_token`` and ``norm.*`` (139 keys at depth 12); converts both ways, strict load, and
    the PyTorch module gives the JAX encoder's features (CLS attends, then is removed)."""
    abstract = nnx.eval_shape(
        lambda: FrameAST(EncoderConfig(width=768, depth=12, heads=12, use_cls=True), rngs=nnx.Rngs(0))
    )
    sd12 = jax.eval_shape(convert.encoder_to_torch, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    assert len(sd12) == 139 and sd12["cls_token"].shape == (1, 1, 768)
    assert set(sd12) == set(convert.encoder_keys(12, clip=True))
    assert "norm.weight" in sd12 and "norm_frame.weight" not in sd12

    params = _random_encoder_params(EncoderConfig(width=64, depth=2, heads=1, use_cls=True), 1)
    sd = convert.encoder_to_torch(params)
    assert list(sd) == convert.encoder_keys(2, clip=True)
    _tree_equal(convert.torch_to_encoder(sd), params)
    tm = torch_encoder.FrameAST.from_state_dict(convert.as_contiguous(sd))
    assert tm.use_cls
    spec = np.random.default_rng(2).standard_normal((2, 64, 200)).astype(np.float32)
    length = np.array([200, 120])
    ej = np.asarray(embed.encoder_from_params(params).intermediate_features(spec, length, 2))
    with torch.no_grad():
        et = tm.get_intermediate_layers(
            torch.from_numpy(spec), torch.from_numpy(length), 2, scene=False
        ).numpy()
    assert np.abs(et[0] - ej[0]).max() < 1e-4
    assert np.abs(et[1, :30] - ej[1, :30]).max() < 1e-4


def test_qkv_rows_are_q_k_v_head_major():
    """Row h·hd + j of the q block is q-head h, unit j (checked with 2 heads of 32 and distinct values)."""
    d, h, hd = 64, 2, 32
    kernel = np.arange(1 * d * 3 * h * hd, dtype=np.float32).reshape(1, d, 3, h, hd)
    params = _random_encoder_params(EncoderConfig(width=d, depth=1, heads=h), 0)
    params["blocks"]["attn"]["qkv"]["kernel"] = kernel
    w = convert.encoder_to_torch(params)["blocks.0.attn.qkv.weight"]
    for t in range(3):
        for head in range(h):
            for j in (0, hd - 1):
                np.testing.assert_array_equal(w[t * d + head * hd + j], kernel[0, :, t, head, j])
    _tree_equal(
        convert.torch_to_encoder(convert.encoder_to_torch(params), heads=h)["blocks"], params["blocks"]
    )


# ----------------------------------------------------------------------------------------------------------
# Files: strict load, round trips, weights_only
# ----------------------------------------------------------------------------------------------------------


def test_safetensors_is_the_bare_encoder_and_loads_strict(run, exports):
    _, state = run
    sd = st_load_torch(str(exports["safetensors", "teacher"]))
    assert set(sd) == set(convert.encoder_keys(DEPTH))
    assert len(sd) == TINY_KEYS and all(v.dtype == torch.float32 for v in sd.values())
    model = torch_encoder.FrameAST(width=WIDTH, depth=DEPTH, heads=HEADS)
    assert not model.load_state_dict(sd, strict=True).missing_keys
    # The teacher's weights, not the student's.
    np.testing.assert_array_equal(sd["pos_embed"].numpy(), state["teacher"]["encoder"]["pos_embed"])
    assert not np.array_equal(sd["pos_embed"].numpy(), state["params"]["encoder"]["pos_embed"])


def test_atst_sed_and_lightning_layouts(run, exports):
    _, state = run
    sed = torch.load(exports["atst_sed", "teacher"], weights_only=True)
    assert list(sed) == ["state_dict"]
    assert {k.removeprefix("model.teacher.encoder.") for k in sed["state_dict"]} == set(
        convert.encoder_keys(DEPTH)
    )

    ck = torch.load(exports["lightning", "teacher"], weights_only=True)
    sd = ck["state_dict"]
    counts = {}
    for k in sd:
        prefix = ".".join(k.split(".")[:3])
        counts[prefix] = counts.get(prefix, 0) + 1
    assert counts == {
        "model.student.encoder": TINY_KEYS,
        "model.student.projector": 7,
        "model.student.predictor": 7,
        "model.teacher.encoder": TINY_KEYS,
        "model.teacher.projector": 7,
    }
    nbt = sd["model.teacher.projector.1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.shape == ()
    assert int(nbt) == int(state["teacher_stats"]["projector"]["bn"]["num_batches_tracked"])
    assert tuple(sd["model.student.predictor.0.weight"].shape) == (32, 16)
    hp = ck["hyper_parameters"]
    required = "arch learning_rate warmup_steps max_steps ema symmetric pos_type avg_blocks patch_embed patch_h patch_w spec_h n_mels nprompt anchor_len win_length"
    assert set(required.split()) <= set(hp)
    assert all(type(v) in (str, int, float, bool) for v in hp.values())
    assert hp["max_steps"] > hp["warmup_steps"] and hp["pos_type"] == "cut" and hp["avg_blocks"] == 0
    assert hp["arch"].startswith("custom") and isinstance(ck["pytorch-lightning_version"], str)
    assert export_cli.arch_name(768, 12, 12) == ("base", True)
    assert export_cli.arch_name(384, 12, 6) == ("small", True)


@pytest.mark.parametrize("fmt", ["safetensors", "atst_sed"])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_round_trip_encoder(run, exports, fmt, which):
    _, state = run
    expected = state["teacher" if which == "teacher" else "params"]["encoder"]
    # ATST-SED files name whichever encoder was exported "model.teacher.encoder".
    _tree_equal(load.load_encoder_params(exports[fmt, which]), expected)


def test_round_trip_lightning(run, exports):
    _, state = run
    got = load.load_pretraining(exports["lightning", "teacher"])
    for key in ("params", "stats", "teacher", "teacher_stats"):
        _tree_equal(got[key], state[key])
    _tree_equal(
        load.load_encoder_params(exports["lightning", "teacher"], encoder="student"),
        state["params"]["encoder"],
    )
    _tree_equal(load.load_encoder_params(exports["lightning", "teacher"]), state["teacher"]["encoder"])


def test_official_release_layout(run, tmp_path):
    """A released-style Lightning file (extra entries, no metadata, plain hyper-parameters) imports."""
    _, state = run
    sd = convert.network_to_torch(state["teacher"], state["teacher_stats"])
    student = convert.network_to_torch(state["params"], state["stats"])
    ckpt = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.7.7",
        "state_dict": {
            **{f"model.teacher.{k}": torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()},
            **{f"model.student.{k}": torch.from_numpy(np.array(v, order="C")) for k, v in student.items()},
        },
        "hyper_parameters": {"arch": "small", "learning_rate": 5e-4, "n_mels": 64},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(ckpt, tmp_path / "official.ckpt")
    _tree_equal(load.load_encoder_params(tmp_path / "official.ckpt"), state["teacher"]["encoder"])
    assert load.load_pretraining(tmp_path / "official.ckpt")["hyper_parameters"]["arch"] == "small"
    with pytest.raises(KeyError, match="no student encoder"):
        load.load_encoder_params(_only_teacher(tmp_path, sd), encoder="student")


def _only_teacher(tmp_path, sd):
    path = tmp_path / "sed.pt"
    torch.save(
        {
            "state_dict": {
                f"model.teacher.{k}": torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()
            }
        },
        path,
    )
    return path


def test_every_load_is_weights_only(run, exports, tmp_path, monkeypatch):
    """All load paths go through ``torch.load(weights_only=True)`` or safetensors: with pickle's loaders
    and any other ``torch.load`` disabled, everything still loads; a file needing pickle is refused."""
    real_load = torch.load
    calls = []

    def guarded_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        calls.append(args[0])
        return real_load(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used to load weights")

    monkeypatch.setattr(torch, "load", guarded_load)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)

    for path in exports.values():
        load.load_encoder_params(path)
    load.load_pretraining(exports["lightning", "teacher"])
    hear.load_model(str(exports["safetensors", "teacher"]))
    hear.load_model(str(exports["atst_sed", "teacher"]))
    # atst_sed ×2, lightning ×2 (encoder + pretraining), hear's atst_sed: torch.load; the safetensors files never touch it.
    assert len(calls) == 5 and not any(str(c).endswith(".safetensors") for c in calls)

    bad = tmp_path / "needs_pickle.ckpt"
    torch.save(
        {"state_dict": {"pos_embed": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(a=1)}, bad
    )
    with pytest.raises(ValueError, match="weights_only=True.*argparse.Namespace"):
        load.load_encoder_params(bad)


def test_cli_errors(run, tmp_path, capsys):
    workdir, _ = run
    cases = [
        (
            ["--workdir", str(tmp_path / "nope"), "--format", "safetensors", "--out", str(tmp_path / "a")],
            "no such run",
        ),
        (
            [
                "--workdir",
                str(workdir),
                "--step",
                "999",
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "a"),
            ],
            "step 999",
        ),
        (["--workdir", str(workdir), "--format", "onnx", "--out", str(tmp_path / "a")], "unknown format"),
        (
            [
                "--workdir",
                str(workdir),
                "--encoder",
                "ema",
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "a"),
            ],
            "unknown encoder",
        ),
    ]
    for argv, needle in cases:
        assert export_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------------------
# Numerics: JAX embeddings vs the exported PyTorch encoder
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jax_embedder(run):
    workdir, _ = run
    encoder, step, _ = embed.read_run_encoder(workdir)
    assert step == 5
    return embed.Embedder(encoder)


def test_block_frontends_match_reference():
    wave = _signal(7.3, 3)
    ref = audio.log_mel_np(wave)
    np.testing.assert_allclose(embed.log_mel(wave, block_frames=333), ref, atol=1e-6)
    got = torch_encoder.LogMel(block_frames=250)(torch.from_numpy(wave)[None])[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    short = _signal(0.02, 4)  # 320 samples: shorter than the reflect padding
    np.testing.assert_allclose(embed.log_mel(short), audio.log_mel_np(short), atol=1e-6)


@pytest.mark.parametrize("seconds", [3.0, 25.0])
def test_jax_and_torch_embeddings_agree(run, exports, jax_embedder, seconds):
    wave = _signal(seconds, int(seconds))
    ej, tj = jax_embedder.frame_embeddings(wave)
    tokens = audio.num_frames(len(wave)) // 4
    assert ej.shape == (tokens, DEPTH * WIDTH) and tj.shape == (tokens,)

    model = hear.load_model(str(exports["safetensors", "teacher"]))
    et, tt = model.timestamp_embeddings(torch.from_numpy(wave)[None])
    assert np.abs(et[0].numpy() - ej).max() < 1e-4
    np.testing.assert_array_equal(tt[0].numpy(), tj.astype(np.float32))
    ct = model.scene_embeddings(torch.from_numpy(wave)[None])[0].numpy()
    assert np.abs(ct - jax_embedder.clip_embedding(wave)).max() < 1e-4
    assert np.abs(ej).max() > 0.5  # not a degenerate all-zero comparison


def test_chunks_are_independent_10s_windows_on_a_global_grid(jax_embedder, run):
    """Tokens 250·k … of a 25 s clip are the encoding of frames 1000·k … alone; the 2501st frame is dropped."""
    wave = _signal(25.0, 25)
    spec = embed.log_mel(wave)
    emb = jax_embedder.spec_embeddings(spec)
    assert spec.shape[1] == 2501 and emb.shape[0] == 625
    encoder = embed.read_run_encoder(run[0])[0]
    for k, (s, e) in enumerate(embed.chunk_bounds(spec.shape[1])):
        direct = np.asarray(encoder.intermediate_features(spec[None, :, s:e], np.array([e - s]), DEPTH))[0]
        assert np.abs(emb[250 * k : 250 * k + direct.shape[0]] - direct).max() < 1e-5
    assert embed.chunk_bounds(2501) == [(0, 1000), (1000, 2000), (2000, 2501)]
    assert embed.chunk_bounds(2003) == [(0, 1000), (1000, 2000)]  # 3 frames: no whole patch


def test_hear_api_on_65s(exports):
    model = hear.load_model(str(exports["safetensors", "teacher"]), max_chunks=4)
    assert model.sample_rate == 16000
    assert model.timestamp_embedding_size == model.scene_embedding_size == DEPTH * WIDTH
    seen = []
    # Every encoder entry point goes through the patch embedding: record what reaches it.
    model.encoder.patch_embed.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))

    audio_in = torch.from_numpy(np.stack([_signal(65.0, 1), 0.5 * _signal(65.0, 2)]))
    emb, ts = hear.get_timestamp_embeddings(audio_in, model)
    tokens = (65 * SR // 160 + 1) // 4
    assert tokens == 1625
    assert emb.shape == (2, tokens, model.timestamp_embedding_size) and ts.shape == (2, tokens)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    np.testing.assert_array_equal(ts[1].numpy(), 40.0 * np.arange(tokens) + 15.0)  # token centres, 40 ms grid
    # Bounded: never more than 1000 frames or max_chunks chunks per encoder call (2 clips × 7 chunks here).
    assert max(s[-1] for s in seen) <= 1000 and max(s[0] for s in seen) <= 4
    assert sum(s[0] for s in seen) == 14
    scene = hear.get_scene_embeddings(audio_in, model)
    assert scene.shape == (2, model.scene_embedding_size)
    torch.testing.assert_close(scene, emb.mean(dim=1))
    assert not torch.allclose(emb[0], emb[1])


# ----------------------------------------------------------------------------------------------------------
# python -m atst_jax.embed
# ----------------------------------------------------------------------------------------------------------


def test_embed_cli(run, exports, jax_embedder, tmp_path, capsys):
    workdir, _ = run
    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "a.wav", _signal(3.0, 7), SR, subtype="PCM_16")
    wave44 = np.interp(np.arange(int(2.5 * 44100)) / 44100, np.arange(int(2.5 * SR)) / SR, _signal(2.5, 8))
    sf.write(src / "sub" / "b.flac", wave44.astype(np.float32), 44100)

    out = tmp_path / "frames"
    assert embed.main(["--workdir", str(workdir), "--audio", str(src), "--out", str(out)]) == 0
    a, ts = np.load(out / "a.npy"), np.load(out / "a.timestamps.npy")
    ref, ref_ts = jax_embedder.frame_embeddings(audio.load_audio(src / "a.wav"))
    np.testing.assert_allclose(a, ref, atol=1e-6)
    np.testing.assert_array_equal(ts, ref_ts)
    assert np.load(out / "sub" / "b.npy").shape == (audio.num_frames(int(2.5 * SR)) // 4, DEPTH * WIDTH)

    out = tmp_path / "clip"
    argv = ["--audio", str(src / "a.wav"), "--out", str(out), "--level", "clip", "--layers", "1"]
    assert embed.main(["--workdir", str(workdir), "--encoder", "student", *argv]) == 0
    clip = np.load(out / "a.npy")
    assert clip.shape == (WIDTH,)
    # The same student encoder read from an export gives the same clip embedding.
    out2 = tmp_path / "clip2"
    argv2 = ["--audio", str(src / "a.wav"), "--out", str(out2), "--level", "clip", "--layers", "1"]
    assert embed.main(["--weights", str(exports["safetensors", "student"]), *argv2]) == 0
    np.testing.assert_allclose(np.load(out2 / "a.npy"), clip, atol=1e-6)

    assert (
        embed.main(["--workdir", str(workdir), "--audio", str(src), "--out", str(out), "--layers", "3"]) == 2
    )
    assert "between 1 and the encoder depth 2" in capsys.readouterr().err
