"""The synthetic default dataset: determinism, label sanity, files, and that each class looks like itself."""

import hashlib

import numpy as np
import pytest
import soundfile as sf

from atst_jax.audio import log_mel_db_np
from atst_jax.data import synthetic

SR = 16000


def test_classes():
    assert len(synthetic.CLASSES) >= 8
    assert len(set(synthetic.CLASSES)) == len(synthetic.CLASSES)


def test_deterministic_and_order_independent():
    forward = {i: synthetic.generate_clip(i, seed=3) for i in (0, 1, 2, 3)}
    backward = {i: synthetic.generate_clip(i, seed=3) for i in (3, 2, 1, 0)}
    for i in forward:
        np.testing.assert_array_equal(forward[i][0], backward[i][0])
        assert forward[i][1] == backward[i][1]
        assert synthetic.clip_events(i, seed=3) == forward[i][1]  # labels alone replay the same draws
    # Interleaving other work with the global numpy RNG changes nothing either.
    np.random.seed(0)
    np.random.standard_normal(1000)
    np.testing.assert_array_equal(synthetic.generate_clip(2, seed=3)[0], forward[2][0])


def test_seeds_and_indices_differ():
    a, _ = synthetic.generate_clip(0, seed=0)
    b, _ = synthetic.generate_clip(0, seed=1)
    c, _ = synthetic.generate_clip(1, seed=0)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    events = [synthetic.clip_events(i, seed=s) for s in (0, 1) for i in range(10)]
    assert len({tuple(e) for e in events}) == len(events)


def test_every_class_appears():
    seen = {label for i in range(100) for _, _, label in synthetic.clip_events(i, seed=0)}
    assert seen == set(synthetic.CLASSES)


def test_event_lists_are_valid():
    counts = set()
    for i in range(200):
        events = synthetic.clip_events(i, seed=7)
        counts.add(len(events))
        assert events == sorted(events)
        for onset, offset, label in events:
            assert 0.0 <= onset < offset <= 10.0
            assert 0.3 - 1e-9 <= offset - onset <= 4.0 + 1e-9
            assert label in synthetic.CLASSES
            assert round(onset, 3) == onset and round(offset, 3) == offset  # whole milliseconds
    assert counts == {1, 2, 3, 4}
    # Shorter clips keep events inside too.
    for i in range(20):
        assert all(off <= 1.0 for _, off, _ in synthetic.clip_events(i, duration=1.0))


def test_levels_and_events_audible():
    for i in range(12):
        wave, events = synthetic.generate_clip(i, seed=11)
        assert wave.dtype == np.float32 and wave.shape == (10 * SR,)
        assert np.all(np.isfinite(wave))
        assert 0.3 - 1e-6 <= np.abs(wave).max() <= 0.9 + 1e-6
        # Events add power on top of the background (SNR >= 0 dB, gains >= -6 dB).
        active = np.zeros(len(wave), dtype=bool)
        for onset, offset, _ in events:
            active[int(onset * SR) : int(offset * SR)] = True
        if (~active).sum() >= SR:  # at least 1 s of background alone
            assert np.mean(wave[active] ** 2) > 1.1 * np.mean(wave[~active] ** 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown event class"):
        synthetic.synthesize_event("tuba", 1000, np.random.default_rng(0))
    with pytest.raises(ValueError):
        synthetic.generate_clip(0, duration=0.1)
    with pytest.raises(ValueError):
        synthetic.generate_clip(0, sample_rate=8000)


# ----------------------------------------------------------------------------------------------------------
# Each class has the spectro-temporal signature it is named for (measured on its log-mel, any parameters)
# ----------------------------------------------------------------------------------------------------------


def _signature(wave: np.ndarray) -> dict[str, float]:
    """Shape descriptors of a log-mel that do not depend on which note, how loud or how fast: activity,
    onsets and their regularity, spectral width and where the energy sits, how the strongest bin moves."""
    db = log_mel_db_np(wave)[:, 10:-10]  # drop the on/off ramps
    energy = 10 * np.log10((10 ** (db / 10)).sum(axis=0))  # frame level, dB
    loud = energy > energy.max() - 15  # sounding frames
    peak = db.argmax(axis=0)  # strongest mel bin per frame
    width = (db >= db.max(axis=0, keepdims=True) - 10).sum(axis=0)  # bins within 10 dB of the frame's peak
    onsets = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    ioi = np.diff(onsets) / 100.0
    both = loud[1:] & loud[:-1]  # consecutive sounding frames
    moves = np.diff(peak)[both]
    moves = moves[moves != 0]
    # Note changes: the strongest bin over the sounding frames (gaps skipped), as runs of one bin held for at
    # least 30 ms; a change is a step of two bins or more between consecutive runs (a glide moves by one).
    held = peak[loud]
    starts = np.r_[0, np.flatnonzero(np.diff(held)) + 1]
    lengths = np.diff(np.r_[starts, len(held)])
    notes = held[starts[lengths >= 3]]
    jumps = np.diff(notes)
    jumps = jumps[np.abs(jumps) >= 2]
    edges = np.flatnonzero(np.diff(loud.astype(int))) + 1
    slopes = [  # energy slope (dB/s) of each sounding stretch of at least 100 ms
        np.polyfit(np.arange(b - a) / 100.0, energy[a:b], 1)[0]
        for a, b in zip(np.r_[0, edges], np.r_[edges, len(loud)], strict=True)
        if loud[a] and b - a >= 10
    ]
    return {
        "active": float(loud.mean()),
        "onsets_per_s": len(onsets) / (db.shape[1] / 100.0),
        "ioi_cv": float(ioi.std() / ioi.mean()) if len(ioi) >= 2 else 0.0,  # 0 = a steady rhythm
        "width": float(np.median(width[loud])),
        "low_peak": float(np.median(peak[loud])),
        "up_share": float((jumps > 0).mean()) if len(jumps) else 0.5,  # of the note changes, rising ones
        "glide": float((np.abs(moves) == 1).sum() / max(both.sum(), 1)),  # one-bin moves per frame
        "decay": float(np.median(slopes)) if slopes else 0.0,
        "pitches": int(len(np.unique(peak[loud]))),
    }


# What each class is named for, in terms of the descriptors. The tonal classes share their four notes, so
# what separates them is the number of pitches and how they move, not where they are.
_RULES = {
    "beeping": lambda s: (
        s["width"] <= 3 and s["pitches"] == 1 and s["onsets_per_s"] > 3 and s["ioi_cv"] < 0.1
    ),
    "doorbell": lambda s: s["width"] <= 3 and 2 <= s["pitches"] <= 3 and s["decay"] < -2,
    "melody_up": lambda s: s["width"] <= 3 and 4 <= s["pitches"] <= 6 and s["up_share"] > 0.6,
    "melody_down": lambda s: s["width"] <= 3 and 4 <= s["pitches"] <= 6 and s["up_share"] < 0.4,
    "siren": lambda s: s["width"] <= 3 and s["pitches"] >= 8 and s["glide"] > 0.05 and s["active"] > 0.99,
    "knocking": lambda s: (
        s["width"] >= 8 and s["active"] < 0.35 and s["ioi_cv"] > 0.3 and s["onsets_per_s"] > 2
    ),
    "footsteps": lambda s: s["width"] >= 8 and s["active"] < 0.2 and s["ioi_cv"] < 0.1,
    "speech": lambda s: s["pitches"] >= 7 and s["onsets_per_s"] > 2.5 and 0.5 < s["active"] < 0.85,
    "dog_bark": lambda s: s["decay"] < -40 and s["active"] < 0.45,
    "engine": lambda s: s["low_peak"] <= 2 and s["active"] > 0.99 and s["width"] >= 10,
}


def _event(label: str, draw: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, synthetic.CLASSES.index(label), draw])
    return synthetic.synthesize_event(label, 2 * SR, rng)


def test_rules_cover_all_classes():
    assert set(_RULES) == set(synthetic.CLASSES)


@pytest.mark.parametrize("label", synthetic.CLASSES)
def test_class_signature(label):
    """Isolated 2 s events, 8 random parameter draws: each shows the shape its class is named for."""
    for draw in range(8):
        wave = _event(label, draw, seed=123)
        assert wave.dtype == np.float32 and np.all(np.isfinite(wave))
        assert np.sqrt(np.mean(wave.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
        sig = _signature(wave)
        assert _RULES[label](sig), f"{label} draw {draw}: {sig}"


def test_classes_are_distinguishable():
    """1-nearest-neighbour on standardised descriptors, 10 reference and 10 held-out draws per class: the
    classes are told apart despite their randomised notes, rates and timbres (measured: 100 %)."""
    feats = np.array(
        [
            [list(_signature(_event(label, d, seed=9)).values()) for d in range(20)]
            for label in synthetic.CLASSES
        ]
    )  # [classes, draws, descriptors]
    ref, held_out = feats[:, :10].reshape(-1, feats.shape[-1]), feats[:, 10:]
    mean, std = ref.mean(axis=0), ref.std(axis=0) + 1e-9
    ref_z, held_z = (ref - mean) / std, (held_out - mean) / std
    dist = ((held_z[:, :, None, :] - ref_z[None, None]) ** 2).sum(axis=-1)
    predicted = np.repeat(np.arange(len(synthetic.CLASSES)), 10)[dist.argmin(axis=-1)]
    accuracy = np.mean(predicted == np.arange(len(synthetic.CLASSES))[:, None])
    assert accuracy >= 0.9, predicted


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_dataset_round_trip_and_idempotent(tmp_path):
    tsv = synthetic.write_dataset(tmp_path, num_clips=4, seed=5)
    assert tsv == tmp_path / "strong_labels.tsv"
    assert tsv.read_text().splitlines()[0] == "filename\tonset\toffset\tevent_label"
    labels = synthetic.read_strong_tsv(tsv)
    assert sorted(labels) == [f"clip_{i:05d}.wav" for i in range(4)]
    for i in range(4):
        wave, events = synthetic.generate_clip(i, seed=5)
        assert labels[f"clip_{i:05d}.wav"] == events
        data, sr = sf.read(tmp_path / "audio" / f"clip_{i:05d}.wav", dtype="float32")
        info = sf.info(tmp_path / "audio" / f"clip_{i:05d}.wav")
        assert sr == SR and info.subtype == "PCM_16" and info.channels == 1
        np.testing.assert_allclose(data, wave, atol=1.0 / 32768 + 1e-7)

    before = {p.name: _digest(p) for p in [tsv, *sorted((tmp_path / "audio").iterdir())]}
    synthetic.write_dataset(tmp_path, num_clips=4, seed=5)
    after = {p.name: _digest(p) for p in [tsv, *sorted((tmp_path / "audio").iterdir())]}
    assert before == after
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_read_strong_tsv_formats(tmp_path):
    path = tmp_path / "labels.tsv"
    # Columns in another order, an extra column, a clip with no events, a blank line.
    path.write_text(
        "event_label\tfilename\toffset\tonset\tconfidence\n"
        "dog\ta.wav\t2.5\t1.0\t0.9\n"
        "\n"
        "cat\ta.wav\t0.75\t0.25\t1\n"
        "\tb.wav\t\t\t\n"
    )
    assert synthetic.read_strong_tsv(path) == {"a.wav": [(1.0, 2.5, "dog"), (0.25, 0.75, "cat")], "b.wav": []}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("a.wav\t1.0\t2.0\tdog\na.wav\tone\t2.0\tdog\n", r"bad\.tsv:3: .*not numbers"),
        ("a.wav\t1.0\t2.0\n", r"bad\.tsv:2: expected 4"),
        ("a.wav\t3.0\t2.0\tdog\n", r"bad\.tsv:2: need 0 <= onset <= offset"),
        ("a.wav\t1.0\t2.0\t\n", r"bad\.tsv:2: empty event_label"),
    ],
)
def test_read_strong_tsv_errors_name_file_and_line(tmp_path, body, match):
    path = tmp_path / "bad.tsv"
    path.write_text("filename\tonset\toffset\tevent_label\n" + body)
    with pytest.raises(ValueError, match=match):
        synthetic.read_strong_tsv(path)


def test_read_strong_tsv_needs_header(tmp_path):
    path = tmp_path / "noheader.tsv"
    path.write_text("a.wav\t1.0\t2.0\tdog\n")
    with pytest.raises(ValueError, match=r"noheader\.tsv:1: header lacks"):
        synthetic.read_strong_tsv(path)
