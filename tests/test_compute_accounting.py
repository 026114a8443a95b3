"""Compute accounting: every run records its device-hours, analytic training FLOPs and mean MFU in
metrics.jsonl, in each checkpoint's metadata (which a resume continues from) and on the Hugging Face model card.

The arithmetic is tested on a fake clock; the run tests reuse the suite's shared 3-step run (``tiny_run``) and
resume a copy of it to 6 steps: the schedule's length is compiled into the step, and 6 is the length
test_reliability's resumed tiny run compiles, so in a full run the step comes from the suite's XLA cache."""

import json
import shutil

import pytest
from conftest import tiny_config

from atst_jax import methods
from atst_jax.metrics import ComputeMeter

SF = 3_000_000_007  # an odd per-step FLOP count: sums must stay exact integers


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def test_totals_accumulate_over_a_resume_and_mfu_is_flops_over_peak_time():
    clock = Clock()
    first = ComputeMeter(SF, 2, 100.0, chip="x", clock=clock)  # 2 devices, 100 TFLOP/s each
    clock.t += 10.0
    a = first.totals(5)
    assert a["device_hours"] == pytest.approx(20 / 3600) and a["flops"] == SF * 5
    assert a["mfu_mean"] == pytest.approx(SF * 5 / (20 * 100e12))
    assert (a["segments"], a["timed_from_step"], a["step_flops"]) == (1, 0, SF)
    assert first.scalars(5) == {
        "compute/device_hours": a["device_hours"],
        "compute/flops": float(SF * 5),
        "compute/mfu_mean": a["mfu_mean"],
    }

    # Resumed from the step-5 checkpoint (its metadata went through JSON) on 4 devices, 30 s later.
    saved = json.loads(json.dumps(a))
    clock2 = Clock(7.0)
    second = ComputeMeter(SF, 4, 100.0, start_step=5, saved=saved, started=2.0, clock=clock2)
    clock2.t = 32.0  # 30 s since its start
    b = second.totals(9)
    assert b["flops"] == SF * 9 and isinstance(b["flops"], int)
    assert b["device_hours"] == pytest.approx((20 + 120) / 3600) and b["segments"] == 2
    assert b["mfu_mean"] == pytest.approx(SF * 9 / (140 * 100e12))
    assert "compute/mfu_mean" in second.scalars(9)


def test_no_stated_peak_means_no_mfu_for_the_rest_of_the_run():
    clock = Clock()
    cpu = ComputeMeter(SF, 1, 0.0, clock=clock)
    clock.t += 36.0
    t = cpu.totals(3)
    assert t["mfu_mean"] is None and t["peak_flops"] is None and t["device_hours"] == pytest.approx(0.01)
    assert set(cpu.scalars(3)) == {"compute/device_hours", "compute/flops"}  # as perf/mfu: absent
    assert "not meaningful" in ComputeMeter.describe(t)
    gpu = ComputeMeter(SF, 1, 989.0, start_step=3, saved=t, clock=clock)  # resumed on a chip with a peak
    assert gpu.totals(4)["mfu_mean"] is None and gpu.totals(4)["flops"] == SF * 4


def test_a_checkpoint_without_totals_gives_its_flops_and_times_from_the_resume():
    clock = Clock()
    meter = ComputeMeter(SF, 1, 100.0, start_step=4, saved=None, clock=clock)
    clock.t += 2.0
    t = meter.totals(6)
    assert t["flops"] == SF * 6 and t["timed_from_step"] == 4
    assert t["mfu_mean"] == pytest.approx(SF * 2 / (2 * 100e12))  # the timed steps only


def test_model_card_shows_compute_and_fingerprint(tmp_path):
    from atst_jax.export import hf

    meta_dir = tmp_path / "checkpoints" / "7" / "meta"
    meta_dir.mkdir(parents=True)
    compute = ComputeMeter(SF, 8, 989.0, chip="h100", clock=Clock()).totals(0)
    compute.update(device_hours=230.0, flops=SF * 7, step=7, mfu_mean=0.412, segments=3)
    data = {"fingerprint": "f" * 64, "clips": 64, "subset_fingerprint": None}
    (meta_dir / "metadata").write_text(json.dumps({"data": data, "compute": compute}))
    variant = {"architecture": "a", "input": "i", "features": "atst_logmel64", "chunk_frames": 10}
    card = hf.model_card(tmp_path, {"train": {"global_batch": 4}}, 7, "teacher", variant, (8, 1, 2), 99)
    assert f"- Data fingerprint: {'f' * 64}" in card
    assert "- Device-hours: 230 (wall time × devices; 8 × h100 in the last start; over 3 starts" in card
    assert f"- Training FLOPs: {SF * 7:.3e} (analytic: {SF:.3e} per step × 7 steps)" in card
    assert "- Mean MFU: 41.2%" in card
    compute.update(mfu_mean=None, chip=None, segments=1)  # a CPU run
    (meta_dir / "metadata").write_text(json.dumps({"platform": "cpu", "data": data, "compute": compute}))
    card = hf.model_card(tmp_path, {}, 7, "teacher", variant, (8, 1, 2), 99)
    assert "- Device-hours: 230 (wall time × devices; 8 × cpu in the last start)" in card
    assert "- Mean MFU: not meaningful" in card
    (meta_dir / "metadata").write_text(json.dumps({"data": data}))
    assert "- Training compute: not recorded" in hf.model_card(tmp_path, {}, 7, "t", variant, (8, 1, 2), 99)


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _compute(workdir, step):
    meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    return meta, meta["compute"]


def test_a_run_records_its_compute_and_a_resume_continues_it(tiny_run, embedded_cache, tmp_path):
    config = tiny_config(embedded_cache)
    step_flops = int(round(methods.build(config).step_flops(config.train.global_batch)))
    meta, first = _compute(tiny_run, 3)
    assert first["flops"] == step_flops * 3 and first["step_flops"] == step_flops and first["step"] == 3
    assert first["device_hours"] > 0 and first["devices"] == meta["device_count"]
    assert first["mfu_mean"] is None and first["chip"] is None  # CPU: no stated peak, as perf/mfu
    rows = _rows(tiny_run)
    assert [r["compute/flops"] for r in rows] == [float(step_flops * r["step"]) for r in rows]
    hours = [r["compute/device_hours"] for r in rows]
    assert 0 < hours[0] <= hours[-1] <= first["device_hours"] and hours == sorted(hours)
    assert not any("compute/mfu_mean" in r for r in rows)

    # Resume a copy for three more steps, now with a stated chip peak. Pretend the first start had one too (the
    # metadata is plain JSON), so the resumed totals carry a mean MFU to check against them.
    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    peak = 989e12  # flops.CHIPS["h100"]
    first["peak_flops"] = first["device_hours"] * 3600 * peak
    (work / "checkpoints" / "3" / "meta" / "metadata").write_text(json.dumps({**meta, "compute": first}))
    from atst_jax.train import train

    train(tiny_config(embedded_cache, steps=6, chip="h100"), str(work))
    _, second = _compute(work, 6)
    assert second["flops"] == step_flops * 6 and second["segments"] == 2 and second["chip"] == "h100"
    assert second["device_hours"] > first["device_hours"]
    assert second["mfu_mean"] == pytest.approx(second["flops"] / (second["device_hours"] * 3600 * peak))
    rows = _rows(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows[3:]:
        assert r["compute/flops"] == float(step_flops * r["step"])
        assert first["device_hours"] < r["compute/device_hours"] <= second["device_hours"]
        expected = r["compute/flops"] / (r["compute/device_hours"] * 3600 * peak)
        assert r["compute/mfu_mean"] == pytest.approx(expected)
