"""A clip shorter than its crop: ATST-Frame, ATST-Clip and ASiT count its padding as signal by default, as the
official data code does (it zero-pads the waveform and reports the crop's full length), and mask it by the
valid length with ``pad_is_signal=False``; AaSP too, with EAT's pad value (tests/test_aasp.py). The other methods
always mask."""

import jax
import numpy as np
import pytest
from conftest import config_path
from flax import nnx

from atst_jax import methods
from atst_jax.train import load_config

OFFICIAL_PADDING = ("atst_frame", "atst_clip", "asit")
# AaSP pads as EAT does (the raw log fbank zero-padded, then counted): its own test is in tests/test_aasp.py.
EAT_PADDING = ("aasp",)


def _method(name, **knobs):
    config = load_config(config_path(name) + ":tiny")
    config.model.update(depth=1, drop_path=0.0)
    for field, value in config[name].items():  # short crops: a quick compile
        if field.endswith("seconds"):
            config[name][field] = min(float(value), 1.0)
        elif field.endswith("frames"):
            config[name][field] = min(int(value), 96)
    config[name].update(knobs)
    return methods.build(config)


def _loss_fn(method, student, teacher, state):
    """The loss of a batch, jitted, on fresh copies of the networks each call (their BatchNorm buffers move)."""
    (s_def, s_state), (t_def, t_state) = nnx.split(student), nnx.split(teacher)

    @jax.jit
    def loss(batch):
        s, t = nnx.merge(s_def, s_state, copy=True), nnx.merge(t_def, t_state, copy=True)
        return method.loss(s, t, state, batch, jax.random.key(1), 0)[0]

    return loss


def _batch(method, lengths):
    rng = np.random.default_rng(0)
    batch = {}
    for crop in method.inputs():
        spec = rng.uniform(-1, 0.5, (len(lengths), method.enc_cfg.n_mels, crop.frames)).astype(np.float32)
        batch[crop.name] = spec
        batch[crop.length_key] = np.minimum(np.asarray(lengths), crop.frames).astype(np.int32)
    return batch


@pytest.mark.parametrize("name", OFFICIAL_PADDING)
def test_padding_counts_as_signal_by_default(name):
    """The same crops with one row's length cut to a third: the default's loss does not move (the padding is
    audio), the masked variant's does; ``padding_as_signal`` is what the loss sees."""
    signal = _method(name)
    assert signal.cfg.pad_is_signal
    full = _batch(signal, [10_000] * 4)
    short = dict(full)
    for crop in signal.inputs():
        short[crop.length_key] = full[crop.length_key].copy()
        short[crop.length_key][1] = crop.frames // 3
    student, teacher, state = signal.init(jax.random.key(0))
    loss = _loss_fn(signal, student, teacher, state)
    assert float(loss(short)) == float(loss(full))
    seen = signal.padding_as_signal(short)
    assert all((seen[c.length_key] == c.frames).all() for c in signal.inputs())

    masked = _method(name, pad_is_signal=False)
    assert masked.padding_as_signal(short) is short
    loss_masked = _loss_fn(masked, student, teacher, state)
    assert float(loss_masked(short)) != float(loss_masked(full))


def test_the_other_methods_always_mask():
    for name in methods.names():
        if name not in OFFICIAL_PADDING + EAT_PADDING:
            method = _method(name)
            assert not hasattr(method.cfg, "pad_is_signal")
            batch = _batch(method, [10_000, 5, 10_000, 10_000])
            assert method.padding_as_signal(batch) is batch
