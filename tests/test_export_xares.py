"""X-ARES encoders (``atst_jax.export.xares``) and ``python -m atst_jax.export --format xares``.

X-ARES' own checker runs on the adapters of tiny random-weight exports of the three layouts (ATST-Frame,
ATST-Clip, a 2-D patch ViT in ASiT's layout; width 64, depth 2), written straight from the PyTorch modules
(no JAX run needed); tiny ATST-Frame, ATST-Clip and ASiT run directories (test_export's and
test_export_asit's) go through the CLI, their encoder files are loaded by path as ``xares.run`` loads them,
pass the checker, and their outputs are matched to the JAX embedder's.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("loguru", reason="xares' checker needs loguru (pip install --no-deps xares loguru)")
xares_checker = pytest.importorskip(
    "xares.audio_encoder_checker", reason="xares is not installed (pip install --no-deps xares loguru)"
)

import test_export  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from atst_jax.export import __main__ as export_cli  # noqa: E402
from atst_jax.export import hear, torch_encoder, torch_vit, xares  # noqa: E402

WIDTH, DEPTH, HEADS = 64, 2, 1
# The layouts' front ends: samples per second and the expected step (ms).
GEOMETRY = {"frame": (16000, 40.0), "clip": (16000, 40.0), "vit": (32000, 160.0)}


def _module(kind):
    torch.manual_seed({"frame": 0, "clip": 1, "vit": 2}[kind])
    if kind == "vit":
        meta = {
            "format": "asit_encoder",
            "features": "kaldi_fbank128",
            "n_mels": "128",
            "chunk_frames": "592",
        }
        return torch_vit.VisionTransformer(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS), meta
    # Chunks shorter than the positions hold (a 6 s crop for the Clip, as the official one; 8 s for the
    # Frame): the chunk length comes from the file, not from the table.
    chunk = "600" if kind == "clip" else "800"
    module = torch_encoder.FrameAST(width=WIDTH, depth=DEPTH, heads=HEADS, use_cls=kind == "clip")
    return module, {"format": f"atst_{kind}_encoder", "chunk_frames": chunk}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{kind: path}``: a random-weight safetensors export of each layout, with the export's metadata."""
    out = tmp_path_factory.mktemp("xares_files")
    paths = {}
    for kind in GEOMETRY:
        module, meta = _module(kind)
        for p in module.parameters():  # LayerNorms start at (1, 0): perturb them too
            p.data += 0.05 * torch.randn_like(p)
        paths[kind] = out / f"{kind}.safetensors"
        sd = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(sd, str(paths[kind]), metadata=dict(meta, heads=str(HEADS)))
    return paths


def _wave(seconds, sr, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * (300 + 200 * np.sin(0.7 * t)) * t) + 0.1 * rng.standard_normal(t.shape)
    return torch.from_numpy(wave.astype(np.float32))


@pytest.mark.parametrize("kind", list(GEOMETRY))
def test_checker_and_ten_minutes(files, kind):
    """X-ARES' checker accepts the adapter; 10 minutes of audio give duration / hop steps (± 1); the other
    layouts' classes refuse the file."""
    enc = xares.LAYOUT_CLASSES[kind](files[kind])
    sr, hop = GEOMETRY[kind]
    assert (enc.sampling_rate, enc.hop_size_in_ms, enc.output_dim) == (sr, hop, WIDTH)
    assert xares_checker.check_audio_encoder(enc)
    out = enc(torch.randn(1, 600 * sr))
    assert out.shape == (1, enc.num_steps(600 * sr), WIDTH)
    assert abs(out.shape[1] - 600_000 / hop) <= 1 and torch.isfinite(out).all()
    # Shorter than one step: zero-padded to one step.
    assert enc(torch.randn(2, enc.min_samples - 1)).shape == (2, 1, WIDTH)
    for other, cls in xares.LAYOUT_CLASSES.items():
        if other != kind:
            with pytest.raises(ValueError, match=f"holds a '{kind}' layout"):
                cls(files[kind])


@pytest.mark.parametrize("kind", list(GEOMETRY))
def test_padding_never_reaches_real_steps(files, kind):
    """(a) With ``lengths``, a clip shorter than one chunk followed by silence or by loud noise gives the same
    real steps, equal to the clip alone (and HEAR's embeddings), and zeros after them. (b) Without lengths,
    the padding of a short last chunk (grouped with a full chunk in one encoder call) is masked: its steps
    equal the encoder run on that chunk's frames alone, unpadded."""
    _check_padding(xares.LAYOUT_CLASSES[kind](files[kind]), kind, files[kind], atol=1e-5)


def _check_padding(enc, kind, path, atol):
    sr = enc.sampling_rate
    clip = _wave(2.3, sr, 3)
    tail = int(1.7 * sr)
    batch = torch.stack([torch.cat([clip, torch.zeros(tail)]), torch.cat([clip, torch.randn(tail)])])
    out = enc(batch, lengths=[len(clip), len(clip)])
    alone = enc(clip[None])
    n = alone.shape[1]
    assert n == enc.num_steps(len(clip)) and out.shape[1] == enc.num_steps(len(clip) + tail) > n
    torch.testing.assert_close(out[:, :n], alone.expand(2, -1, -1), atol=atol, rtol=0)
    assert not out[:, n:].any()
    ref, _ = hear.get_timestamp_embeddings(clip[None], hear.load_model(str(path), n_blocks=1))
    torch.testing.assert_close(alone, ref, atol=1e-6, rtol=0)

    chunk = enc.embedder.chunk_frames
    wave = _wave(1.5 * chunk * 0.01, sr, 4)  # 10 ms frames: one and a half chunks
    got = enc(wave[None])[0]
    spec = enc.embedder.frontend(wave[None])
    p = enc.time_patch
    last = spec[..., chunk:, :] if kind == "vit" else spec[..., chunk:]
    frames = last.shape[-2] if kind == "vit" else last.shape[-1]
    frames -= frames % p
    last = last[..., :frames, :] if kind == "vit" else last[..., :frames]
    length = torch.tensor([frames])
    if kind == "vit":
        want = enc.embedder.encoder.column_outputs(last[:, None], length)[0, 1:]
    else:
        want = enc.embedder.encoder.block_outputs(last, length)[0, int(kind == "clip") :]
    torch.testing.assert_close(got[chunk // p :], want, atol=atol, rtol=0)


def test_an_aape_branch_rides_along(tmp_path):
    """An ATST-Frame export with the AaPE branch (``model.aape``) is the same layout and grid: the Frame class
    serves it, the checker passes, and padding stays out of real steps (to the branch's float32 rounding)."""
    import dataclasses
    import json

    from atst_jax.export.torch_aape import AaPE
    from atst_jax.models.aape import AapeConfig

    module, meta = _module("frame")
    aape = dataclasses.asdict(AapeConfig())
    module.aape = AaPE(aape, n_mels=64, stride=4, token_bins=64, width=WIDTH)
    for p in module.parameters():
        p.data += 0.05 * torch.randn_like(p)
    path = tmp_path / "aape.safetensors"
    meta = dict(meta, heads=str(HEADS), format=meta["format"] + "+aape", aape=json.dumps(aape))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)
    enc = xares.ATSTFrameEncoder(path)
    assert type(enc.embedder.encoder).__name__ == "AaPEFrameAST"
    assert enc.hop_size_in_ms == 40.0 and xares_checker.check_audio_encoder(enc)
    _check_padding(enc, "frame", path, atol=1e-4)


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xares_frame_run")
    return workdir, test_export._write_run(test_export._tiny_config(), workdir, 0)


def test_cli_encoder_file_loads_by_path_and_matches_jax(frame_run, tmp_path, monkeypatch, capsys):
    """``--format xares`` writes the weights and an encoder file that X-ARES' own loader (by path, relative
    to the working directory) turns into a no-argument encoder passing the checker; its steps equal the JAX
    embedder's (last block) within 1e-4 on a clip of two chunks; a re-export replaces the directory."""
    from xares.utils import attr_from_py_path

    from atst_jax.eval import embed

    workdir, _ = frame_run
    out = tmp_path / "xares_cli_frame"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert export_cli.main(["--workdir", str(workdir), "--format", "xares", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"replaced {out} (xares, teacher)" in printed and "atst_frame_encoder.py" in printed
    assert sorted(p.name for p in out.iterdir()) == ["atst_frame_encoder.py", "encoder.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no partial or old directory left

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = (out.name, f"{out.name}.atst_frame_encoder")  # what the import below adds to sys.modules
    try:
        cls = attr_from_py_path(f"{out.name}/atst_frame_encoder.py", endswith="Encoder")
    finally:
        for name in modules:
            sys.modules.pop(name, None)
    enc = cls()
    assert type(enc).__name__ == "ATSTFrameEncoder" and xares_checker.check_audio_encoder(enc)

    wave = test_export._signal(12.0, 5)  # 1201 frames: a full 1000-frame chunk and a short one
    got = enc(torch.from_numpy(wave)[None])[0].numpy()
    encoder, _, _ = embed.read_run_encoder(workdir)
    want, _ = embed.Embedder(encoder, n_blocks=1).frame_embeddings(wave)
    assert got.shape == want.shape == (300, WIDTH)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_cli_refusals(frame_run, tmp_path, capsys):
    workdir, _ = frame_run
    (tmp_path / "file").write_text("x")
    argv = ["--workdir", str(workdir), "--format", "xares", "--out", str(tmp_path / "file")]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and len(err.strip().splitlines()) == 1
    argv = ["--workdir", str(tmp_path / "missing"), "--format", "xares", "--out", str(tmp_path / "x")]
    assert export_cli.main(argv) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_encoder_file_only_for_what_the_adapter_serves(files, tmp_path):
    """The encoder file names the class of the weights' layout. A ViT recording EAT's 16 kHz fbank is served at
    16 kHz; a front end the PyTorch side does not compute (the ATST log-mel recorded on a ViT, the 16 kHz fbank
    on an ATST layout) is refused in one ValueError, before any file is written, by X-ARES and HEAR alike."""
    from safetensors import safe_open

    from atst_jax.export import hear

    for kind, name in (("clip", "atst_clip_encoder.py"), ("vit", "vit_encoder.py")):
        d = tmp_path / kind
        d.mkdir()
        (d / xares.WEIGHTS).write_bytes(files[kind].read_bytes())
        path = xares.write_encoder_file(d)
        assert path.name == name and f"class {xares.LAYOUT_CLASSES[kind].__name__}(" in path.read_text()

    def recorded(kind, features):
        with safe_open(str(files[kind]), framework="pt") as f:
            sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        d = tmp_path / f"{kind}_{features}"
        d.mkdir()
        save_file(sd, str(d / xares.WEIGHTS), metadata=dict(meta, features=features))
        return d

    d = recorded("vit", "kaldi_fbank128_16k")
    assert xares.write_encoder_file(d).name == "vit_encoder.py"
    enc = xares.ViTEncoder(d / xares.WEIGHTS)
    assert (enc.sampling_rate, enc.hop_size_in_ms) == (16000, 160.0)
    assert hear.load_model(str(d / xares.WEIGHTS)).sample_rate == 16000
    for kind, features, computes in (
        ("vit", "atst_logmel64", "kaldi_fbank128 or kaldi_fbank128_16k only"),
        ("clip", "kaldi_fbank128_16k", "atst_logmel64 only"),
    ):
        d = recorded(kind, features)
        with pytest.raises(ValueError, match=f"takes {features} features; .* computes {computes}"):
            xares.write_encoder_file(d)
        assert sorted(p.name for p in d.iterdir()) == [xares.WEIGHTS]
        # HEAR's loader refuses it too, rather than computing a front end the encoder never saw.
        with pytest.raises(ValueError, match=f"takes {features} features"):
            hear.load_model(str(d / xares.WEIGHTS))


def _clip_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xares_clip_run")
    return workdir, test_export._write_run(test_export._tiny_config("atst_clip"), workdir, 1)


def _asit_run(tmp_path_factory):
    import test_export_asit

    return test_export_asit.run._get_wrapped_function()(tmp_path_factory)[0], None


@pytest.mark.parametrize(
    "make_run, name, cls, sr",
    [(_clip_run, "atst_clip", "ATSTClipEncoder", 16000), (_asit_run, "vit", "ViTEncoder", 32000)],
)
def test_runs_of_the_other_layouts_through_the_cli(make_run, name, cls, sr, tmp_path_factory, monkeypatch):
    """A tiny ATST-Clip run and a tiny ASiT run (test_export's and test_export_asit's run directories) through
    ``--format xares``: the encoder file's class passes X-ARES' checker and equals the JAX embedder's last
    block within 1e-4 on a clip longer than one chunk."""
    from xares.utils import attr_from_py_path

    from atst_jax import inference
    from atst_jax.eval import embed

    workdir, _ = make_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("xares_cli")
    out = root / f"xares_{name}"
    assert export_cli.main(["--workdir", str(workdir), "--format", "xares", "--out", str(out)]) == 0
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    try:
        enc = attr_from_py_path(f"{out.name}/{name}_encoder.py", endswith="Encoder")()
    finally:
        for module in (out.name, f"{out.name}.{name}_encoder"):
            sys.modules.pop(module, None)
    assert type(enc).__name__ == cls and enc.sampling_rate == sr and xares_checker.check_audio_encoder(enc)
    encoder, _, config = embed.read_run_encoder(workdir)
    embedder = embed.Embedder(
        encoder, n_blocks=1, chunk_frames=inference.encoder_chunk_frames(encoder.cfg, config)
    )
    wave = _wave(2.0 * embedder.chunk_frames / 100 + 0.3, sr, 7).numpy()  # two chunks and a short third
    want, _ = embedder.frame_embeddings(wave)
    got = enc(torch.from_numpy(wave)[None])[0].numpy()
    assert got.shape == want.shape and got.shape[0] > 2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
