"""Data lineage: prepare's manifest and fingerprint, `data.compare`, and the fingerprints runs record."""

import json
import os
import shutil
import types

import pytest

from atst_jax.cli import run as cli_run
from atst_jax.data import compare, lineage, pipeline, prepare, synthetic


def _plan(cache, rows, tmp_path, name):
    """A weak-label DCASE plan of the embedded clips ``rows`` (``[(filename, labels)]``)."""
    tsv = tmp_path / f"{name}.tsv"
    tsv.write_text("filename\tevent_labels\n" + "".join(f"{f}\t{','.join(c)}\n" for f, c in rows))
    return prepare.plan_dcase(str(tsv), os.path.join(cache, "audio"), classes=list(synthetic.CLASSES))


@pytest.fixture(scope="module")
def rows(embedded_cache):
    strong = sorted(synthetic.read_strong_tsv(os.path.join(embedded_cache, "strong_labels.tsv")).items())
    return [(f, sorted({c for _, _, c in evs}) or [synthetic.CLASSES[0]]) for f, evs in strong[:6]]


@pytest.fixture(scope="module")
def prepared(embedded_cache, rows, tmp_path_factory):
    """``a``: 6 clips in one shard; ``b``: the same, 3 shards built by two jobs (the first leaves the dataset
    incomplete, the second finishes it); ``c``: clip 0 missing, clip 1 relabelled, clip 5 the same."""
    root = tmp_path_factory.mktemp("lineage")
    a = str(root / "a")
    prepare.build(_plan(embedded_cache, rows, root, "a"), a, workers=0, progress=False)
    b = str(root / "b")
    plan = _plan(embedded_cache, rows, root, "b")
    first = prepare.build(plan, b, shards=3, num_jobs=2, job_index=0, workers=0, progress=False)
    assert not first["complete"] and not os.path.exists(os.path.join(b, lineage.MANIFEST))
    prepare.build(plan, b, shards=3, num_jobs=2, job_index=1, workers=0, progress=False)
    c = str(root / "c")
    other = [c for c in synthetic.CLASSES if c not in rows[1][1]][0]
    changed = [rows[1][0], [other]], *rows[2:]
    prepare.build(_plan(embedded_cache, changed, root, "c"), c, workers=0, progress=False)
    return a, b, c


def test_manifest_lists_every_clip_and_its_fingerprint_ignores_sharding(prepared, rows):
    a, b, _ = prepared
    header_a, entries_a = lineage.read_manifest(a)
    header_b, entries_b = lineage.read_manifest(b)
    assert header_a["clips"] == 6 and header_a["fingerprint"] == header_b["fingerprint"]
    assert sorted(entries_a, key=lambda e: e["id"]) == sorted(entries_b, key=lambda e: e["id"])
    assert [e["file"] for e in entries_a] == [f for f, _ in rows]  # relative to the audio dir
    assert all(e["seconds"] > 0 and len(e["sha256"]) == 64 for e in entries_a)
    # Manifest order is record order: the hashes are those of the stored records, read back.
    recomputed = lineage.entries_from_records(pipeline.list_record_files(b))
    assert [(e["id"], e["sha256"], e["seconds"]) for e in recomputed] == [
        (e["id"], e["sha256"], e["seconds"]) for e in entries_b
    ]
    # The trainer's view: the whole set, and a drawn subset of it.
    files = pipeline.list_record_files(b)
    assert lineage.training_data(files) == {
        "fingerprint": header_a["fingerprint"],
        "clips": 6,
        "subset_fingerprint": None,
    }
    drawn = lineage.training_data(files, subset=3, subset_seed=7)
    keep = pipeline.subset_indices(6, 3, 7)
    assert drawn["clips"] == 3 and drawn["subset_fingerprint"] == lineage.fingerprint(
        (entries_b[i]["id"], entries_b[i]["sha256"]) for i in keep
    )


def test_compare_names_the_missing_and_the_changed_clip(prepared, rows, capsys):
    a, b, c = prepared
    assert cli_run(compare.main, [a, b]) == 0
    assert "identical" in capsys.readouterr().out
    assert cli_run(compare.main, [a, c]) == 1
    out = capsys.readouterr().out
    gone, relabelled = os.path.splitext(rows[0][0])[0], os.path.splitext(rows[1][0])[0]
    only_a = out.split("only in A (1):\n")[1].splitlines()[0]
    assert gone in only_a and rows[0][0] in only_a  # its id and its source file
    assert "in both, different content (1):\n  " + relabelled in out and "only in B" not in out
    assert cli_run(compare.main, [a, a + "_missing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_a_dataset_without_manifest_is_unknown_not_an_error(prepared, tmp_path, capsys):
    a, _, c = prepared
    old = str(tmp_path / "old")
    shutil.copytree(c, old)
    os.remove(os.path.join(old, lineage.MANIFEST))
    assert lineage.training_data(pipeline.list_record_files(old))["fingerprint"] is None
    assert cli_run(compare.main, [a, old]) == 1  # hashed from the records instead
    assert "has no manifest.jsonl" in capsys.readouterr().err


def test_evaluate_results_carry_split_fingerprints(prepared):
    from atst_jax.eval import data as eval_data
    from atst_jax.eval import probe

    a, b, _ = prepared
    train, val = eval_data.hold_out(eval_data.read_labelled(a, "--train"), 0.34)
    test = eval_data.read_labelled(b, "--test")
    cfg = types.SimpleNamespace(width=8, depth=1, stem="patch", use_cls=False)
    res = probe._results(
        "clip", {"train": train, "val": val, "test": test}, "f", {}, probe.Options(),
        types.SimpleNamespace(n_blocks=1), 0.04, 100, cfg, {},
    )  # fmt: skip
    assert res["data"]["test"]["fingerprint"] == lineage.read_manifest(b)[0]["fingerprint"]
    halves = {res["data"][k]["fingerprint"] for k in ("train", "val")}
    assert None not in halves and len(halves) == 2 and res["data"]["train"]["clips"] == 4


def test_a_run_records_the_fingerprint_of_its_data(tiny_run, embedded_cache):
    files = pipeline.ensure_embedded_dataset(embedded_cache, num_clips=64, seed=0)
    expected = lineage.read_manifest(os.path.dirname(files[0]))[0]["fingerprint"]
    meta = json.loads((tiny_run / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["data"] == {"fingerprint": expected, "clips": 64, "subset_fingerprint": None}
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data"] == meta["data"] and "loss" in rows[0]
    assert all("data" not in r for r in rows[1:])
