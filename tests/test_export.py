"""PyTorch export, import, HEAR API and JAX embeddings (issue 6; contract: spec/torch_export.md).

A tiny ATST-Frame and a tiny ATST-Clip (width 64, depth 2, 1 head of 64) with randomly perturbed
parameters — so that a wrong transpose, a swapped q/k/v or head order, or student/teacher mix-up changes
numbers — are written as real Orbax checkpoints once per module; every test works from them.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import soundfile as sf  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import load_file as st_load_torch  # noqa: E402

from atst_jax import audio, inference  # noqa: E402
from atst_jax.checkpoint import Checkpointer, read_checkpoint  # noqa: E402
from atst_jax.eval import embed  # noqa: E402
from atst_jax.export import __main__ as export_cli  # noqa: E402
from atst_jax.export import convert, hear, load, torch_encoder  # noqa: E402
from atst_jax.methods import build, get_class  # noqa: E402
from atst_jax.models.encoder import EncoderConfig, FrameAST  # noqa: E402
from atst_jax.train import load_config  # noqa: E402

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


def _tiny_config(method: str = "atst_frame"):
    config = load_config(f"configs/{method}.py:tiny")
    config.model.width, config.model.depth, config.model.heads = WIDTH, DEPTH, HEADS
    config[method].proj_hidden, config[method].proj_dim = 32, 16
    if method == "atst_frame":
        # The official 10 s crop, so inference chunks as the official code does (1000 frames): the export
        # and embedding tests below are about that layout. Shorter crops: test_chunks_follow_the_trained_crop.
        config.atst_frame.crop_seconds = 10.0
    return config


def _write_run(config, workdir, seed):
    """One checkpoint (step 5) of ``config``'s method with perturbed parameters; returns the stored state."""
    student, teacher, _ = build(config).init(jax.random.key(0))
    rng = np.random.default_rng(seed)
    state = {
        "step": np.asarray(5, np.int32),
        "params": _perturb(nnx.to_pure_dict(nnx.state(student, nnx.Param)), rng),
        "stats": _random_stats(nnx.to_pure_dict(nnx.state(student, nnx.BatchStat)), rng),
        "teacher": _perturb(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), rng),
        "teacher_stats": _random_stats(nnx.to_pure_dict(nnx.state(teacher, nnx.BatchStat)), rng),
        "opt": {"count": np.asarray(5, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    ckpt = Checkpointer(workdir, save_every=1, keep=3, async_save=False)
    ckpt.save(5, state, config=config, force=True)
    ckpt.close()
    _, _, stored = read_checkpoint(workdir)
    return stored


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with one checkpoint (step 5) of a tiny ATST-Frame; returns (workdir, state)."""
    workdir = tmp_path_factory.mktemp("run")
    return workdir, _write_run(_tiny_config(), workdir, 0)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """The same for a tiny ATST-Clip (CLS token, final ``norm``; 4 s anchor, 3 s positive crops)."""
    workdir = tmp_path_factory.mktemp("clip_run")
    return workdir, _write_run(_tiny_config("atst_clip"), workdir, 1)


def _export_all(workdir, out):
    """All formats for both encoders: ``{(format, encoder): path}``."""
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


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    return _export_all(run[0], tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def clip_exports(clip_run, tmp_path_factory):
    return _export_all(clip_run[0], tmp_path_factory.mktemp("clip_exports"))


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
    config = load_config("configs/atst_frame.py:base")
    config.model.width, config.model.heads = width, heads
    student = nnx.eval_shape(lambda: build(config).init(jax.random.key(0))[0])
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
    ej = np.asarray(inference.encoder_from_params(params).intermediate_features(spec, length, 2))
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
    frame_config = read_checkpoint(run[0])[1]
    assert export_cli._lightning_hparams(frame_config, 768, 12, 12)[0]["arch"] == "base"
    assert export_cli._lightning_hparams(frame_config, 384, 12, 6)[0]["arch"] == "small"


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


def test_a_failed_export_leaves_the_earlier_file_and_no_partial_one(
    run, exports, tmp_path, monkeypatch, capsys
):
    """The writer dies half-way (disk full): ``--out`` keeps the earlier export byte for byte and no partial
    file is left beside it; the next export replaces it whole, readable by all."""
    import safetensors.numpy

    out = tmp_path / "enc.safetensors"
    good = exports["safetensors", "teacher"].read_bytes()
    out.write_bytes(good)
    argv = ["--workdir", str(run[0]), "--format", "safetensors", "--encoder", "student", "--out", str(out)]

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.numpy, "save_file", dies_half_way)
        assert export_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write --out") and "No space left" in err, err
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert export_cli.main(argv) == 0
    assert capsys.readouterr().out.startswith(f"replaced {out}")
    assert out.read_bytes() != good and out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


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
    np.testing.assert_allclose(inference.log_mel(wave, block_frames=333), ref, atol=1e-6)
    got = torch_encoder.LogMel(block_frames=250)(torch.from_numpy(wave)[None])[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    short = _signal(0.02, 4)  # 320 samples: shorter than the reflect padding
    np.testing.assert_allclose(inference.log_mel(short), audio.log_mel_np(short), atol=1e-6)


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
    spec = inference.log_mel(wave)
    emb = jax_embedder.spec_embeddings(spec)
    assert spec.shape[1] == 2501 and emb.shape[0] == 625
    encoder = embed.read_run_encoder(run[0])[0]
    for k, (s, e) in enumerate(inference.chunk_bounds(spec.shape[1])):
        direct = np.asarray(encoder.intermediate_features(spec[None, :, s:e], np.array([e - s]), DEPTH))[0]
        assert np.abs(emb[250 * k : 250 * k + direct.shape[0]] - direct).max() < 1e-5
    assert inference.chunk_bounds(2501) == [(0, 1000), (1000, 2000), (2000, 2501)]
    assert inference.chunk_bounds(2003) == [(0, 1000), (1000, 2000)]  # 3 frames: no whole patch


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


# ----------------------------------------------------------------------------------------------------------
# ATST-Clip: export, strict load, parity, round trips, HEAR, embed
# ----------------------------------------------------------------------------------------------------------

CLIP_CHUNK = 400  # the tiny Clip run's longest crop (4 s anchor): 401 frames, cut to whole 4-frame patches


def test_clip_safetensors_layout_strict_and_metadata(clip_run, clip_exports, exports):
    _, state = clip_run
    path = clip_exports["safetensors", "teacher"]
    sd = st_load_torch(str(path))
    assert set(sd) == set(convert.encoder_keys(DEPTH, clip=True))
    assert len(sd) == TINY_KEYS + 1 and "norm_frame.weight" not in sd
    assert tuple(sd["cls_token"].shape) == (1, 1, WIDTH)
    model = torch_encoder.FrameAST(width=WIDTH, depth=DEPTH, heads=HEADS, use_cls=True)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    np.testing.assert_array_equal(sd["cls_token"].numpy(), state["teacher"]["encoder"]["cls_token"])
    np.testing.assert_array_equal(sd["norm.weight"].numpy(), state["teacher"]["encoder"]["norm"]["scale"])

    meta = load.read_file(path)[1]["metadata"]
    assert meta["format"] == "atst_clip_encoder" and meta["chunk_frames"] == str(CLIP_CHUNK)
    frame_meta = load.read_file(exports["safetensors", "teacher"])[1]["metadata"]
    assert frame_meta["format"] == "atst_frame_encoder" and frame_meta["chunk_frames"] == "1000"

    sed = torch.load(clip_exports["atst_sed", "teacher"], weights_only=True)["state_dict"]
    assert {k.removeprefix("model.teacher.encoder.") for k in sed} == set(
        convert.encoder_keys(DEPTH, clip=True)
    )


def test_clip_torch_matches_jax_cls_and_tokens(clip_run, clip_exports):
    """Same perturbed parameters, same input: the CLS and token outputs of the JAX ``FrameAST(use_cls=True)``
    and of the strict-loaded PyTorch export agree within 1e-4 — final output and the last-n-blocks features."""
    _, state = clip_run
    params = state["teacher"]["encoder"]
    cfg = EncoderConfig(width=WIDTH, depth=DEPTH, heads=HEADS, use_cls=True, drop_path=0.0)
    jm = inference.encoder_from_params(params, cfg)  # a JAX FrameAST(cfg) holding the run's parameters
    tm = torch_encoder.FrameAST.from_state_dict(st_load_torch(str(clip_exports["safetensors", "teacher"])))
    assert tm.use_cls

    rng = np.random.default_rng(5)
    spec = rng.standard_normal((2, 64, 400)).astype(np.float32)
    length = np.array([400, 250])
    valid = [1 + 100, 1 + 62]  # CLS + valid tokens
    with jax.default_matmul_precision("highest"):
        final_j = np.asarray(jm(spec, length))
        feats_j = np.asarray(inference.block_features(jm, spec, length, DEPTH))
    with torch.no_grad():
        final_t = tm(torch.from_numpy(spec), torch.from_numpy(length)).numpy()
        feats_t = tm.block_outputs(torch.from_numpy(spec), torch.from_numpy(length), DEPTH).numpy()
    assert final_j.shape == final_t.shape == (2, 101, WIDTH)
    assert feats_j.shape == feats_t.shape == (2, 101, DEPTH * WIDTH)
    for b, v in enumerate(valid):
        assert np.abs(final_j[b, 0] - final_t[b, 0]).max() < 1e-4  # CLS
        assert np.abs(final_j[b, 1:v] - final_t[b, 1:v]).max() < 1e-4  # tokens
        assert np.abs(feats_j[b, :v] - feats_t[b, :v]).max() < 1e-4
    assert np.abs(final_j[:, 0]).max() > 0.5  # not a degenerate comparison
    # The CLS attends to the tokens (a different input changes it).
    assert np.abs(final_j[0, 0] - final_j[1, 0]).max() > 1e-3


@pytest.mark.parametrize("fmt", ["safetensors", "atst_sed"])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_clip_round_trip_encoder(clip_run, clip_exports, fmt, which):
    _, state = clip_run
    got = load.load_encoder_params(clip_exports[fmt, which])
    _tree_equal(got, state["teacher" if which == "teacher" else "params"]["encoder"])
    assert inference.config_from_params(got).use_cls


def test_clip_lightning_export_and_round_trip(clip_run, clip_exports):
    workdir, state = clip_run
    config = read_checkpoint(workdir)[1]
    ck = torch.load(clip_exports["lightning", "teacher"], weights_only=True)
    counts = {}
    for k in ck["state_dict"]:
        prefix = ".".join(k.split(".")[:3])
        counts[prefix] = counts.get(prefix, 0) + 1
    assert counts == {
        "model.student.encoder": TINY_KEYS + 1,
        "model.student.projector": 7,
        "model.student.predictor": 7,
        "model.teacher.encoder": TINY_KEYS + 1,
        "model.teacher.projector": 7,
    }
    assert "model.teacher.encoder.cls_token" in ck["state_dict"]
    hp = ck["hyper_parameters"]
    # The official ATSTLightningModule's arguments, from the run's config.
    optim, train = config["optim"], config["train"]
    assert hp["arch"] == f"custom_d{WIDTH}_l{DEPTH}_h{HEADS}"
    assert hp["learning_rate"] == pytest.approx(optim["base_lr"] * train["global_batch"] / 256)
    assert (hp["warmup_steps"], hp["max_steps"]) == (optim["warmup_steps"], train["steps"])
    assert hp["ema"] == optim["ema"]
    assert all(type(v) in (str, int, float, bool) for v in hp.values())
    assert isinstance(ck["pytorch-lightning_version"], str)

    got = load.load_pretraining(clip_exports["lightning", "teacher"])
    for key in ("params", "stats", "teacher", "teacher_stats"):
        _tree_equal(got[key], state[key])


def test_lightning_refused_for_a_method_without_layout(clip_run, tmp_path, monkeypatch, capsys):
    method = get_class("atst_clip")
    monkeypatch.setattr(method, "lightning_hparams", classmethod(lambda cls, config, **kw: None))
    out = tmp_path / "x.ckpt"
    argv = ["--workdir", str(clip_run[0]), "--format", "lightning", "--out", str(out)]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no official Lightning" in err and "\n" not in err and not out.exists()


def test_run_encoder_config_infers_use_cls_for_old_configs(clip_run):
    workdir, state = clip_run
    config = read_checkpoint(workdir)[1]
    params = state["teacher"]["encoder"]
    assert inference.run_encoder_config(config, params).use_cls
    old = {**config, "model": {k: v for k, v in config["model"].items() if k != "use_cls"}}
    cfg = inference.run_encoder_config(old, params)
    assert cfg.use_cls and cfg.dtype == "float32" and cfg.drop_path == 0.0
    frame_params = {k: v for k, v in params.items() if k != "cls_token"}
    assert not inference.run_encoder_config(old, frame_params).use_cls
    with pytest.raises(ValueError, match="use_cls=False"):
        inference.run_encoder_config({**config, "model": {**config["model"], "use_cls": False}}, params)
    assert inference.run_chunk_frames(config, True) == CLIP_CHUNK
    assert inference.run_chunk_frames(None, True) == 600  # the official default train_len, 6 s
    # The longest crop the method trains on (Method.inputs()): a 9 s anchor gives 901 frames → 900.
    longer = {**config, "atst_clip": {**config["atst_clip"], "anchor_seconds": 9.0}}
    assert inference.run_chunk_frames(longer, True) == 900
    assert inference.run_chunk_frames(None, False) == inference.CHUNK_FRAMES  # an official ATST-Frame file


def test_chunks_follow_the_trained_crop():
    """An ATST-Frame run chunks at the crop it pretrained on (positions past it never got a gradient): the
    official 10 s → 1000 frames, tiny's 6 s → 600, the CPU demo's 1.6 s → 160; never more than the encoder's
    positional table holds, nor 1000."""
    for variant, crop, frames in (("tiny", 10.0, 1000), ("tiny", 6.0, 600), ("demo", None, 160)):
        config = load_config(f"configs/atst_frame.py:{variant}")
        if crop is not None:
            config.atst_frame.crop_seconds = crop
        plain = config.to_dict()
        assert inference.run_chunk_frames(plain, False) == frames
        cfg = EncoderConfig.from_config(plain["model"])
        assert inference.encoder_chunk_frames(cfg, plain) == frames
    assert inference.default_chunk_frames(False, 1201) == 1000  # capped at the 251-slot table's 250 tokens
    assert inference.default_chunk_frames(False, None, num_pos=41) == 160  # a 40-slot table
    assert inference.default_chunk_frames(True, None, num_pos=101) == 400  # ATST-Clip: 6 s, but 100 slots


@pytest.fixture(scope="module")
def clip_jax_embedder(clip_run):
    workdir, _ = clip_run
    encoder, _, config = embed.read_run_encoder(workdir)
    assert encoder.cfg.use_cls
    return embed.Embedder(encoder, chunk_frames=inference.run_chunk_frames(config, True))


def test_clip_hear_api(clip_exports, clip_jax_embedder):
    """Sizes; timestamps are the tokens without CLS; scene = [CLS ‖ mean], with the clip CLS the
    token-weighted mean of per-chunk CLS features; long audio in chunks of the pretraining crop; JAX agrees."""
    model = hear.load_model(str(clip_exports["safetensors", "teacher"]), max_chunks=4)
    assert model.sample_rate == 16000 and model.chunk_frames == CLIP_CHUNK
    assert model.timestamp_embedding_size == DEPTH * WIDTH
    assert model.scene_embedding_size == 2 * DEPTH * WIDTH
    seen = []
    model.encoder.patch_embed.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))

    audio_in = torch.from_numpy(np.stack([_signal(65.0, 3), 0.5 * _signal(65.0, 4)]))
    emb, ts = hear.get_timestamp_embeddings(audio_in, model)
    tokens = (65 * SR // 160 + 1) // 4
    assert emb.shape == (2, tokens, DEPTH * WIDTH) and ts.shape == (2, tokens)
    np.testing.assert_array_equal(ts[0].numpy(), 40.0 * np.arange(tokens) + 15.0)
    # 6501 frames: 16 chunks of 400 and one of 101, per clip; never more than 400 frames or 4 chunks a call.
    assert max(s[-1] for s in seen) <= CLIP_CHUNK and max(s[0] for s in seen) <= 4
    assert sum(s[0] for s in seen) == 34

    scene = hear.get_scene_embeddings(audio_in, model)
    assert scene.shape == (2, model.scene_embedding_size)
    n = DEPTH * WIDTH
    torch.testing.assert_close(scene[:, n:], emb.mean(dim=1))
    # The CLS half, rebuilt chunk by chunk with the encoder alone.
    spec = model.frontend(audio_in[:1])
    cls, weight = 0.0, 0
    for s, e in inference.chunk_bounds(spec.shape[-1], CLIP_CHUNK):
        with torch.no_grad():
            out = model.encoder.block_outputs(spec[:, :, s:e], torch.tensor([e - s]), DEPTH)
        cls = cls + ((e - s) // 4) * out[0, 0]
        weight += (e - s) // 4
    torch.testing.assert_close(scene[0, :n], cls / weight, atol=1e-5, rtol=1e-5)

    # One chunk: exactly the encoder's single-chunk scene feature [CLS ‖ mean].
    short = torch.from_numpy(_signal(3.0, 5))[None]
    one = model.encoder.get_intermediate_layers(model.frontend(short), torch.tensor([301]), DEPTH, scene=True)
    torch.testing.assert_close(hear.get_scene_embeddings(short, model), one, atol=1e-5, rtol=1e-5)

    # JAX side, on a clip of four chunks (3 × 400 + 101 frames).
    wave = _signal(13.0, 6)
    ej, _ = clip_jax_embedder.frame_embeddings(wave)
    et, _ = model.timestamp_embeddings(torch.from_numpy(wave)[None])
    assert ej.shape == (325, n) and np.abs(et[0].numpy() - ej).max() < 1e-4
    sj = clip_jax_embedder.clip_embedding(wave)
    st = model.scene_embeddings(torch.from_numpy(wave)[None])[0].numpy()
    assert sj.shape == (2 * n,) and np.abs(sj - st).max() < 1e-4
    assert clip_jax_embedder.max_frames_seen <= CLIP_CHUNK


def test_embed_cli_clip(clip_run, clip_exports, clip_jax_embedder, tmp_path):
    workdir, _ = clip_run
    wav = tmp_path / "a.wav"
    sf.write(wav, _signal(8.0, 9), SR, subtype="PCM_16")
    wave = audio.load_audio(wav)

    out = tmp_path / "frames"
    assert embed.main(["--workdir", str(workdir), "--audio", str(wav), "--out", str(out)]) == 0
    ref, ref_ts = clip_jax_embedder.frame_embeddings(wave)
    np.testing.assert_allclose(np.load(out / "a.npy"), ref, atol=1e-6)
    np.testing.assert_array_equal(np.load(out / "a.timestamps.npy"), ref_ts)
    assert ref.shape == (audio.num_frames(len(wave)) // 4, DEPTH * WIDTH)

    out = tmp_path / "clip"
    assert (
        embed.main(["--workdir", str(workdir), "--audio", str(wav), "--out", str(out), "--level", "clip"])
        == 0
    )
    clip = np.load(out / "a.npy")
    assert clip.shape == (2 * DEPTH * WIDTH,)
    np.testing.assert_allclose(clip, clip_jax_embedder.clip_embedding(wave), atol=1e-6)
    np.testing.assert_allclose(clip[DEPTH * WIDTH :], ref.mean(axis=0), atol=1e-6)

    # The same student encoder from the run and from its export (chunk length from the file's metadata).
    argv = ["--audio", str(wav), "--level", "clip", "--layers", "1", "--encoder", "student"]
    assert embed.main(["--workdir", str(workdir), "--out", str(tmp_path / "r"), *argv]) == 0
    weights = str(clip_exports["safetensors", "student"])
    assert embed.main(["--weights", weights, "--out", str(tmp_path / "w"), *argv]) == 0
    got = np.load(tmp_path / "w" / "a.npy")
    assert got.shape == (2 * WIDTH,)
    np.testing.assert_allclose(got, np.load(tmp_path / "r" / "a.npy"), atol=1e-6)
