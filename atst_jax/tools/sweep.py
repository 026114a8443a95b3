"""Sweeps: a grid of training runs, started on this machine, a SLURM cluster or a TPU slice, that finishes
despite preemptions and crashes when it is simply run again.

    python -m atst_jax.sweep --config configs/M.py:V --grid 'model.width=128,256; train.steps=500,1000' \\
        --root DIR [--launcher local|slurm|tpu] [--parallel N] [--dry-run] [--in-process] \\
        [--launcher-args 'ARGS'] [--config.FIELD=VALUE ...]
    python -m atst_jax.sweep status DIR

The grid is the product of its axes (``FIELD=V1,V2,...`` separated by ``;``); ``--config.FIELD=VALUE``
overrides apply to every run. Each run gets a name from its grid values (``width128-steps500``) and its own
workdir ``DIR/<name>/`` holding ``train.args`` (its trainer arguments, one per line) next to the trainer's
checkpoints and ``metrics.jsonl``. ``DIR/sweep.json`` is the plan (config, grid, runs, their overrides and
target steps) and ``DIR/runs.txt`` the run names in order (line i+1 = run i = SLURM array element i). A root
belongs to one sweep: another config or grid is refused with one line. A grid value of a tuple field is
written whole, brackets and all (``compose.mask_block=(5,1),(5,5)``).

A run belongs to the config that trained it, which its checkpoints carry (the trainer saves it with every
step): before anything is written or started, each run's newest checkpoint is compared with the run's planned
config by the trainer's own ownership check (``checkpoint.config_differences``, plus ``train.steps``, which a
sweep's runs are defined by), whether ``sweep.json`` exists or not. A run trained with another config (a root
reused without its ``sweep.json``, a config file edited since) is refused with one line naming the fields
that differ: it is never counted done, its ``train.args`` never rewritten; ``status`` shows it as
``foreign`` and ``scaling`` leaves it out of the fits.

Idempotent: a run whose newest committed checkpoint reaches its ``train.steps`` is done and skipped; any other
run is (re)started, and the trainer resumes it from its newest checkpoint (bit-identical to an uninterrupted
run), so after a crash, a kill or a preemption the same command finishes only what is missing.

Launchers:

* ``local`` (default): ``--parallel N`` trainer processes at a time on this machine (``python -m
  atst_jax.train``, log in ``DIR/<name>/train.log``). Each running run holds a lock on its workdir (inherited
  by the trainer, so it outlives a killed sweep), which is how ``status`` and a second sweep see that it runs.
  SIGTERM / Ctrl-C is passed to the trainers as SIGTERM: they checkpoint and exit; the sweep then stops.
  ``--in-process`` trains the runs one after another inside this process instead (no JAX start-up per run).
* ``slurm``: one array job through ``launch/slurm.sbatch`` (``sbatch --array=<pending runs>[%N]``), one
  element per run that is not done; each element checkpoints on SIGTERM and requeues itself, as single runs
  do. ``--launcher-args`` go to ``sbatch`` (e.g. ``'--nodes=1 --time=4:00:00'``).
* ``tpu``: the runs one after another on a slice through ``launch/tpu_pod.sh train`` (the root must be
  ``gs://``), polling ``launch/tpu_pod.sh status`` until each trainer has exited. A run that ends short of its
  steps (a preempted spot slice) stops the sweep: recreate the slice and run the sweep again.
  ``--launcher-args`` go to ``tpu_pod.sh`` (e.g. ``'--zone us-east5-a --name pod1'``).

``--dry-run`` validates every run's config (the knob ranges included, before anything compiles), prints the
plan and what would be started (for ``slurm`` the submission script, for ``tpu`` the commands) and starts
nothing. It writes nothing either, except for ``slurm``: the printed script's array elements read
``runs.txt`` and their ``train.args``, so that dry run writes the plan files and the script runs as printed.
``status`` prints, per run, done / running / failed / stopped (started, not running, not done) / pending /
foreign (trained with another config) with its last logged step and loss.

Exit status: 0 when every run is done (or, for ``slurm``, the array job was submitted), 1 when runs failed or
were stopped, 2 for bad input (one line).
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from atst_jax.cli import ArgumentParser, fail
from atst_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PLAN_FILE, RUNS_FILE, ARGS_FILE, STATE_FILE, LOCK_FILE = (
    "sweep.json",
    "runs.txt",
    "train.args",
    "sweep_state.json",
    ".sweep.lock",
)
LAUNCHERS = ("local", "slurm", "tpu")


class SweepError(UserError):
    """Bad input: reported as one line, exit 2."""


# ======================================================================================================
# Paths (a TPU sweep lives in gs://, where only etils.epath reaches)
# ======================================================================================================
def _path(p):
    if "://" in str(p):
        from etils import epath

        return epath.Path(str(p))
    return Path(p)


def _remote(p) -> bool:
    return "://" in str(p)


# ======================================================================================================
# Grid
# ======================================================================================================
def parse_grid(text: str | None) -> list[tuple[str, list[str]]]:
    """``"model.width=128,256; train.steps=500,1000"`` → ``[("model.width", ["128", "256"]), ...]``."""
    axes: list[tuple[str, list[str]]] = []
    for entry in (text or "").split(";"):
        if not entry.strip():
            continue
        field, sep, values = (s.strip() for s in entry.partition("="))
        if not sep or not field or not re.fullmatch(r"[A-Za-z_][\w.]*", field):
            raise SweepError(
                f"--grid: malformed axis {entry.strip()!r}, expected FIELD=V1,V2,... e.g. model.width=128,256"
            )
        vals = [v.strip() for v in _split_values(values)]
        if not all(vals):
            raise SweepError(f"--grid: axis {field!r} has an empty value ({values!r})")
        if len(set(vals)) != len(vals):
            raise SweepError(f"--grid: axis {field!r} repeats a value ({values!r})")
        if field in (a for a, _ in axes):
            raise SweepError(f"--grid: axis {field!r} given twice")
        axes.append((field, vals))
    return axes


def _split_values(text: str) -> list[str]:
    """An axis's values split on the commas outside brackets, so a tuple field's values stay whole:
    ``(5,1),(5,5)`` → ``["(5,1)", "(5,5)"]``."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def normalise_axes(config, axes: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Each grid value read as its field's type (``064`` = ``64``, ``1e-3`` = ``0.001``, ``True`` = ``true``),
    so one value spelled two ways is a repeat (one line) instead of two runs of the same config; a value the
    field cannot take is refused here too. The runs keep the values as written (their names, and the plan of a
    sweep already on disk, stay as they were)."""
    from atst_jax.config import find_field, parse_value
    from atst_jax.sharding import ConfigError

    out = []
    for field, values in axes:
        try:
            node, leaf = find_field(config, field)
            typed = [parse_value(node[leaf], v, field) for v in values]
        except ConfigError as e:
            raise SweepError(f"--grid: {' '.join(str(e).split())}") from None
        canonical = [str(v).lower() if isinstance(v, bool) else str(v) for v in typed]
        if len(set(canonical)) != len(canonical):
            raise SweepError(
                f"--grid: axis {field!r} repeats a value ({','.join(values)} reads as {','.join(canonical)})"
            )
        out.append((field, values))
    return out


def _short_names(fields: list[str]) -> dict[str, str]:
    """The last component of each field (``model.width`` → ``width``), or the whole path where two share it."""
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (s if last.count(s) == 1 else f.replace(".", "_")) for f, s in zip(fields, last, strict=True)}


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "_", value).strip("_") or "_"


def expand(axes: list[tuple[str, list[str]]]) -> list[tuple[str, dict[str, str]]]:
    """``[(name, {field: value})]`` for the product of the axes, the last axis varying fastest."""
    if not axes:
        return [("run", {})]
    short = _short_names([f for f, _ in axes])
    runs = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        overrides = dict(zip((f for f, _ in axes), combo, strict=True))
        name = "-".join(f"{short[f]}{_slug(v)}" for f, v in overrides.items())
        runs.append((name, overrides))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):  # values that differ only in characters the slug drops
        runs = [(f"{n}-{i}", o) for i, (n, o) in enumerate(runs)]
    return runs


# ======================================================================================================
# Config overrides (typed like the config's own field, the way config_flags parses them)
# ======================================================================================================
def apply_overrides(config, overrides: dict[str, str]):
    """Sets ``field=value`` strings on a ConfigDict, as the trainer's ``--config.FIELD=VALUE`` does (typed by
    the field's value; an unknown field is one line with the closest match)."""
    from atst_jax import config as config_lib

    return config_lib.apply_overrides(config, list(overrides.items()))


def run_config(spec: str, overrides: dict[str, str]):
    """The ConfigDict of one run: the config file's variant with the sweep's and the run's overrides."""
    from atst_jax.config import load_config

    return apply_overrides(load_config(_config_path(spec)), overrides)


def _config_path(spec: str) -> str:
    """A config spec relative to the repository (how it is stored) made absolute for this machine."""
    path, sep, variant = spec.partition(":")
    if not os.path.isabs(path):
        path = str(REPO / path)
    return path + sep + variant


def _stored_spec(spec: str) -> str:
    """Config specs are stored relative to the repository root when they lie inside it, so the plan runs from
    any checkout (a SLURM job's REPO_DIR, a TPU worker's copy)."""
    path, sep, variant = spec.partition(":")
    absolute = Path(path).resolve()
    if not absolute.is_file():
        raise SweepError(f"--config {spec}: no such config file {path!r}")
    try:
        path = str(absolute.relative_to(REPO))
    except ValueError:
        path = str(absolute)
    return path + sep + variant


# ======================================================================================================
# The plan
# ======================================================================================================
@dataclasses.dataclass
class Run:
    index: int
    name: str
    overrides: dict[str, str]  # the grid's values for this run
    steps: int

    def args(self, fixed: dict[str, str]) -> list[str]:
        """Trainer arguments: the sweep's fixed overrides, then the run's grid values."""
        return [f"--config.{k}={v}" for k, v in {**fixed, **self.overrides}.items()]


@dataclasses.dataclass
class Plan:
    root: str
    config: str  # config spec, relative to the repository when inside it
    grid: list[tuple[str, list[str]]]
    fixed: dict[str, str]
    runs: list[Run]
    probe: dict | None = None  # {"train": DATA, "test": DATA}: what scaling.py evaluates each run on
    # Each run's planned config as the trainer saves it (a plain dict), built on first use.
    _configs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def workdir(self, run: Run):
        return _path(self.root) / run.name

    def run_config_dict(self, run: Run) -> dict:
        """The config this plan trains ``run`` with, as the trainer's checkpoints store it."""
        if run.name not in self._configs:
            config = run_config(self.config, {**self.fixed, **run.overrides})
            self._configs[run.name] = json.loads(config.to_json_best_effort())
        return self._configs[run.name]

    def to_json(self) -> dict:
        return {
            "version": 1,
            "config": self.config,
            "grid": [[f, v] for f, v in self.grid],
            "fixed": self.fixed,
            "probe": self.probe,
            "runs": [dataclasses.asdict(r) for r in self.runs],
        }

    def identity(self) -> dict:
        """What makes two plans the same sweep (the launcher and parallelism may change between reruns)."""
        return {"config": self.config, "grid": [[f, list(v)] for f, v in self.grid], "fixed": self.fixed}


def make_plan(root: str, spec: str, grid_text: str | None, fixed: dict[str, str], probe=None) -> Plan:
    """Expands the grid and validates every run's config (one line for the first bad one) before anything
    is written or started."""
    from atst_jax.config import check_config
    from atst_jax.sharding import ConfigError

    stored = _stored_spec(spec)
    axes = parse_grid(grid_text)
    clash = sorted(set(fixed) & {f for f, _ in axes})
    if clash:
        raise SweepError(f"{clash[0]} is both a --grid axis and a --config override")
    axes = normalise_axes(run_config(stored, {}), axes)
    runs = []
    for index, (name, overrides) in enumerate(expand(axes)):
        try:
            config = run_config(stored, {**fixed, **overrides})
            mesh = [v for v in config.mesh.values() if v > 0]
            devices = 1
            for v in mesh:
                devices *= v
            check_config(config, devices)
        except ConfigError as e:
            where = f"run {name}: " if overrides else ""
            raise SweepError(f"{where}{' '.join(str(e).split())}") from None
        runs.append(Run(index, name, overrides, int(config.train.steps)))
    return Plan(str(root).rstrip("/"), stored, axes, dict(fixed), runs, probe)


def load_plan(root) -> Plan:
    path = _path(root) / PLAN_FILE
    if not path.exists():
        raise SweepError(f"{root}: no {PLAN_FILE} (not a sweep root)")
    try:
        d = json.loads(path.read_text())
        return Plan(
            str(root).rstrip("/"),
            d["config"],
            [(f, list(v)) for f, v in d["grid"]],
            dict(d["fixed"]),
            [Run(**r) for r in d["runs"]],
            d.get("probe"),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise SweepError(f"{path}: unreadable plan ({type(e).__name__}: {e})") from None


def write_plan(plan: Plan) -> None:
    """``sweep.json``, ``runs.txt`` and every run's ``train.args``; refuses a root holding another sweep."""
    root = _path(plan.root)
    existing = root / PLAN_FILE
    if existing.exists():
        old = load_plan(plan.root)
        if old.identity() != plan.identity():
            mine, theirs = plan.identity(), old.identity()
            what = next(k for k in mine if mine[k] != theirs[k])
            raise SweepError(
                f"{plan.root} holds another sweep ({what} differs: {theirs[what]} -> {mine[what]}); "
                "use another --root"
            )
        if old.probe and not plan.probe:
            plan.probe = old.probe
    check_ownership(plan)  # with or without sweep.json: no run of another config is claimed
    root.mkdir(parents=True, exist_ok=True)
    _write_text(root / PLAN_FILE, json.dumps(plan.to_json(), indent=1) + "\n")
    _write_text(root / RUNS_FILE, "".join(f"{r.name}\n" for r in plan.runs))
    for run in plan.runs:
        wd = plan.workdir(run)
        wd.mkdir(parents=True, exist_ok=True)
        _write_text(wd / ARGS_FILE, "".join(f"{a}\n" for a in run.args(plan.fixed)))


def _write_text(path, text: str) -> None:
    if _remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # readers never see half a file
    tmp.write_text(text)
    os.replace(tmp, path)


# ======================================================================================================
# Run state (from the files alone, so `status` works for every launcher)
# ======================================================================================================
def committed_steps(workdir) -> list[int]:
    """Steps Orbax has finished writing (a digit-named directory with its commit marker)."""
    ckpts = _path(workdir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    steps = []
    for p in ckpts.iterdir():
        if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists():
            steps.append(int(p.name))
    return sorted(steps)


def last_metrics(workdir) -> dict | None:
    """The last line of ``metrics.jsonl`` (read from its tail: the file grows with the run)."""
    path = _path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    if _remote(path):
        lines = path.read_text().splitlines()
    else:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            lines = fh.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:  # a line cut by the tail window or by a crash mid-write
            continue
    return None


def saved_config(workdir, step: int) -> dict | None:
    """The config a run's checkpoint ``step`` was trained with (the trainer saves it with every step), or
    None when the step has none or it cannot be read."""
    path = _path(workdir) / "checkpoints" / str(step) / "config" / "metadata"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def foreign_differences(plan: Plan, run: Run) -> list[str]:
    """``["model.width: 64 -> 128", ...]``: how the config that trained the run's newest checkpoint differs
    from the plan's, by the trainer's own ownership check (``checkpoint.config_differences``); empty for a
    run of this plan, one without checkpoints, or a checkpoint that saved no config (which the trainer
    cannot check either). ``train.steps`` also counts here, though a resumed run may change it: a run's
    schedule spans its steps, so a checkpoint of a longer or shorter run is not this plan's run."""
    steps = committed_steps(plan.workdir(run))
    saved = saved_config(plan.workdir(run), steps[-1]) if steps else None
    if saved is None:
        return []
    from atst_jax.checkpoint import config_differences

    mine = plan.run_config_dict(run)
    diffs = config_differences(saved, mine)
    theirs = (saved.get("train") or {}).get("steps")
    if theirs is not None and theirs != run.steps:
        diffs.append(f"train.steps: {theirs!r} -> {run.steps!r}")
    return diffs


def shown_differences(diffs: list[str]) -> str:
    """At most three differing fields on a line, then how many more."""
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def foreign_message(plan: Plan, run: Run, diffs: list[str]) -> str:
    """One line: the run, its checkpoint and what differs."""
    step = committed_steps(plan.workdir(run))[-1]
    return (
        f"run {run.name} was trained with another config: its checkpoint (step {step}) differs from this "
        f"sweep's in {shown_differences(diffs)}, so it is neither counted done nor rewritten; move "
        f"{plan.workdir(run)} away or use another --root"
    )


def check_ownership(plan: Plan) -> None:
    """Raises ``SweepError`` (one line, the first such run) when a run's checkpoint belongs to another
    config: a root without ``sweep.json``, or whose config file changed since, must not pass another
    sweep's runs off as this one's."""
    foreign = [(run, d) for run in plan.runs if (d := foreign_differences(plan, run))]
    if foreign:
        more = f" ({len(foreign) - 1} more runs differ too)" if len(foreign) > 1 else ""
        raise SweepError(foreign_message(plan, *foreign[0]) + more)


def lock_held(workdir) -> bool:
    """True while a sweep (or the trainer it started) holds the run's lock."""
    if _remote(workdir):
        return False
    path = Path(workdir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def read_state(workdir) -> dict:
    path = _path(workdir) / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def run_status(plan: Plan, run: Run, slurm_states: dict[int, str] | None = None) -> dict:
    """``{"state", "step", "loss", "checkpoint", "note"}`` of one run."""
    wd = plan.workdir(run)
    steps = committed_steps(wd)
    ckpt = steps[-1] if steps else None
    metrics = last_metrics(wd) or {}
    saved = read_state(wd)
    out = {
        "state": "pending",
        "step": metrics.get("step"),
        "loss": metrics.get("loss"),
        "checkpoint": ckpt,
        "note": "",
    }
    try:
        diffs = foreign_differences(plan, run) if ckpt is not None else []
    except UserError as e:  # the config file is gone or broken: status still reports what the files say
        diffs, out["note"] = [], f"config not compared: {' '.join(str(e).split())}"
    if diffs:
        out["state"] = "foreign"
        out["note"] = f"trained with another config: {shown_differences(diffs)}"
    elif ckpt is not None and ckpt >= run.steps:
        out["state"] = "done"
    elif lock_held(wd):
        out["state"] = "running"
    elif slurm_states and run.index in slurm_states:
        out["state"] = "running" if slurm_states[run.index] == "RUNNING" else "queued"
        out["note"] = f"slurm {slurm_states[run.index].lower()}"
    elif saved.get("state") == "failed":
        out["state"] = "failed"
        out["note"] = f"exit {saved.get('rc')}: {saved.get('message', '')}".strip()
    elif ckpt is not None or out["step"] is not None:
        out["state"] = "stopped"
    return out


def _slurm_states(plan_json: dict) -> dict[int, str]:
    """Array element → SLURM state of the sweep's submitted jobs, when ``squeue`` is reachable."""
    jobs = plan_json.get("slurm_jobs") or []
    if not jobs or not _which("squeue"):
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%K %T"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            states[int(parts[0])] = parts[1]
    return states


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def status_table(plan: Plan, statuses: list[dict]) -> str:
    width = max([len("run")] + [len(r.name) for r in plan.runs])
    lines = [f"sweep {plan.root}: {plan.config}, {len(plan.runs)} runs"]
    lines.append(f"  {'run':<{width}}  {'state':<8} {'step':>13}  {'loss':>9}  {'checkpoint':>10}  note")
    for run, s in zip(plan.runs, statuses, strict=True):
        step = f"{s['step'] if s['step'] is not None else '-'}/{run.steps}"
        loss = f"{s['loss']:.4f}" if isinstance(s["loss"], (int, float)) else "-"
        ckpt = str(s["checkpoint"]) if s["checkpoint"] is not None else "-"
        lines.append(f"  {run.name:<{width}}  {s['state']:<8} {step:>13}  {loss:>9}  {ckpt:>10}  {s['note']}")
    counts = {}
    for s in statuses:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    lines.append("  " + state_counts(counts, len(plan.runs)))
    return "\n".join(lines)


STATE_WORDS = {  # how each state reads in the summary sentence
    "running": "running",
    "queued": "queued",
    "failed": "failed",
    "stopped": "stopped before finishing",
    "pending": "not started",
    "foreign": "trained with another config",
}


def state_counts(counts: dict[str, int], total: int) -> str:
    """``"1 of 3 runs done; 1 failed, 1 stopped before finishing."``"""
    done = counts.get("done", 0)
    if done == total:
        head = f"all {total} runs done" if total > 1 else "the run is done"
    else:
        head = f"{done} of {total} run{'s' * (total > 1)} done"
    rest = [f"{counts[k]} {word}" for k, word in STATE_WORDS.items() if counts.get(k)]
    return head + ("; " + ", ".join(rest) if rest else "") + "."


def statuses(plan: Plan) -> list[dict]:
    plan_json = {}
    path = _path(plan.root) / PLAN_FILE
    if path.exists():
        plan_json = json.loads(path.read_text())
    slurm = _slurm_states(plan_json)
    return [run_status(plan, r, slurm) for r in plan.runs]


def is_done(plan: Plan, run: Run) -> bool:
    """The run's newest checkpoint reaches its steps and was trained with its planned config."""
    steps = committed_steps(plan.workdir(run))
    return bool(steps) and steps[-1] >= run.steps and not foreign_differences(plan, run)


# ======================================================================================================
# Local launcher
# ======================================================================================================
def _log(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _lock(workdir: Path):
    """Opens and locks the run's lock file without blocking; None when another process holds it."""
    fh = open(Path(workdir) / LOCK_FILE, "a")  # noqa: SIM115 - held for the run's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _claim(run, workdir: Path, summary: dict):
    """The run's lock, its workdir made; None (the run recorded as stopped, with a line) when another process
    holds it."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _lock(workdir)
    if lock is None:
        _log(f"{run.name}: already running (its lock is held by another process), not started")
        summary["stopped"].append(run.name)
    return lock


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def trainer_command(plan: Plan, run: Run) -> list[str]:
    python = os.environ.get("ATST_SWEEP_PYTHON") or sys.executable
    return [
        python,
        "-m",
        "atst_jax.train",
        "--config",
        _config_path(plan.config),
        "--workdir",
        str(plan.workdir(run)),
        *run.args(plan.fixed),
    ]


def _resume_point(workdir, run: Run) -> str:
    """Where a rerun picks the run up, as a sentence."""
    steps = committed_steps(workdir)
    if not steps:
        return "no checkpoint saved yet, so a rerun starts it from step 0"
    return f"checkpoint at step {steps[-1]} of {run.steps}, where a rerun resumes it"


def _progress_line(plan: Plan, running: dict) -> str:
    parts = []
    for name, (run, _, _) in running.items():
        m = last_metrics(plan.workdir(run)) or {}
        loss = f" loss {m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else ""
        parts.append(f"{name} step {m.get('step', 0)}/{run.steps}{loss}")
    return "running: " + "; ".join(parts)


def run_local(plan: Plan, parallel: int = 1, progress_every: float = 60.0) -> dict:
    """Runs every run that is not done, ``parallel`` trainer processes at a time. Returns ``{"done",
    "skipped", "failed", "stopped"}`` (lists of run names)."""
    summary = {"done": [], "skipped": [], "failed": [], "stopped": []}
    queue = []
    for run in plan.runs:
        if is_done(plan, run):
            summary["skipped"].append(run.name)
        else:
            queue.append(run)
    if summary["skipped"]:
        _log(f"{len(summary['skipped'])} run(s) already done, skipped: {', '.join(summary['skipped'])}")
    running: dict[str, tuple[Run, subprocess.Popen, object]] = {}
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is None:
            _log(f"{signal.Signals(signum).name}: asking the trainers to checkpoint and exit")
        stop["signal"] = signum
        for _, proc, _ in running.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    last_progress = time.monotonic()
    try:
        while queue or running:
            while queue and len(running) < parallel and stop["signal"] is None:
                run = queue.pop(0)
                wd = Path(plan.workdir(run))
                lock = _claim(run, wd, summary)
                if lock is None:
                    continue
                _write_text(wd / STATE_FILE, json.dumps({"state": "running", "started": time.time()}))
                log = open(wd / "train.log", "a")  # noqa: SIM115 - closed when the run ends
                log.write(f"=== {time.strftime('%F %T')} {shlex.join(trainer_command(plan, run))}\n")
                log.flush()
                # Own session: a Ctrl-C at the terminal reaches the sweep only, which passes one SIGTERM on
                # (a second SIGINT straight to a trainer would abort it without saving). The lock's file
                # descriptor is inherited, so the run stays locked while the trainer lives, even if the
                # sweep itself is killed.
                proc = subprocess.Popen(
                    trainer_command(plan, run),
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(lock.fileno(),),
                )
                log.close()
                running[run.name] = (run, proc, lock)
                _log(f"started {run.name} (pid {proc.pid}), log {wd / 'train.log'}")
            for name, (run, proc, lock) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                wd = Path(plan.workdir(run))
                if rc == 0 and is_done(plan, run):
                    _write_text(wd / STATE_FILE, json.dumps({"state": "done", "rc": 0, "ended": time.time()}))
                    summary["done"].append(name)
                    m = last_metrics(wd) or {}
                    loss = f", loss {m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else ""
                    _log(f"done {name}: {run.steps} steps{loss}")
                elif rc == 0:  # stopped by a signal: checkpointed, resumable
                    _write_text(
                        wd / STATE_FILE, json.dumps({"state": "stopped", "rc": 0, "ended": time.time()})
                    )
                    summary["stopped"].append(name)
                    _log(f"stopped {name}: {_resume_point(wd, run)}")
                else:
                    message = _last_line(wd / "train.log")
                    state = {"state": "failed", "rc": rc, "message": message, "ended": time.time()}
                    _write_text(wd / STATE_FILE, json.dumps(state))
                    summary["failed"].append(name)
                    _log(f"FAILED {name} (exit {rc}): {message}")
                lock.close()
            if stop["signal"] is not None and not running:
                summary["stopped"] += [r.name for r in queue]
                queue = []
            if running and time.monotonic() - last_progress >= progress_every:
                _log(_progress_line(plan, running))
                last_progress = time.monotonic()
            if running:
                time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return summary


def run_in_process(plan: Plan) -> dict:
    """Trains the runs that are not done one after another in this process (``--in-process``). The trainer's
    own SIGTERM / Ctrl-C handling applies: the run checkpoints and the sweep stops."""
    from absl import flags

    from atst_jax import train

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags
        flags.FLAGS.mark_as_parsed()
    summary = {
        "done": [],
        "skipped": [r.name for r in plan.runs if is_done(plan, r)],
        "failed": [],
        "stopped": [],
    }
    if summary["skipped"]:
        _log(f"{len(summary['skipped'])} run(s) already done, skipped: {', '.join(summary['skipped'])}")
    for run in plan.runs:
        if run.name in summary["skipped"]:
            continue
        wd = Path(plan.workdir(run))
        lock = _claim(run, wd, summary)
        if lock is None:
            continue
        try:
            _log(f"training {run.name} in this process")
            _write_text(wd / STATE_FILE, json.dumps({"state": "running", "started": time.time()}))
            config = run_config(plan.config, {**plan.fixed, **run.overrides})
            try:
                result = train.train(config, str(wd))
            except Exception as e:  # noqa: BLE001 - a failed run is recorded; the others still run
                message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                _write_text(wd / STATE_FILE, json.dumps({"state": "failed", "rc": 1, "message": message}))
                summary["failed"].append(run.name)
                _log(f"FAILED {run.name}: {message}")
                continue
            if result["preempted"]:
                _write_text(wd / STATE_FILE, json.dumps({"state": "stopped", "rc": 0}))
                summary["stopped"].append(run.name)
                summary["stopped"] += [r.name for r in plan.runs[run.index + 1 :] if not is_done(plan, r)]
                break
            _write_text(wd / STATE_FILE, json.dumps({"state": "done", "rc": 0}))
            summary["done"].append(run.name)
        finally:
            lock.close()
    return summary


# ======================================================================================================
# SLURM and TPU launchers
# ======================================================================================================
def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (sbatch --array syntax)."""
    out, start = [], None
    for i, j in itertools.zip_longest(indices, indices[1:]):
        start = i if start is None else start
        if j != i + 1:
            out.append(str(i) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def slurm_submission(plan: Plan, runs: list[Run], parallel: int | None, launcher_args: list[str]):
    """``(script, argv, env)``: the array job submission as a bash script (what ``--dry-run`` prints) and as
    the argv + environment the sweep runs."""
    root = str(Path(plan.root).resolve())
    array = _ranges([r.index for r in runs]) + (f"%{parallel}" if parallel else "")
    job = f"sweep-{Path(root).name}"
    env = {"SWEEP_ROOT": root, "CONFIG": plan.config, "REPO_DIR": str(REPO)}
    argv = [
        "sbatch",
        "--parsable",
        f"--array={array}",
        f"--job-name={job}",
        f"--output={root}/logs/%x-%A_%a.out",
        "--export=ALL",
        *launcher_args,
        "launch/slurm.sbatch",
    ]
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# Sweep {root}: {len(runs)} of {len(plan.runs)} runs as one SLURM array job through launch/slurm.sbatch.",
        "# Element i trains the run on line i+1 of $SWEEP_ROOT/runs.txt in $SWEEP_ROOT/<run> with the trainer",
        "# arguments of $SWEEP_ROOT/<run>/train.args; on SIGTERM it checkpoints and requeues itself.",
        "#   element  run",
        *(f"#   {r.index:>7}  {r.name}" for r in runs),
        "set -euo pipefail",
        f"cd {q(str(REPO))}",
        f"mkdir -p {q(root + '/logs')}",
        "export " + " ".join(f"{k}={q(v)}" for k, v in env.items()),
        " ".join(q(a) for a in argv),
    ]
    return "\n".join(lines) + "\n", argv, env


def tpu_commands(plan: Plan, run: Run, launcher_args: list[str]) -> tuple[list[str], list[str]]:
    """``(train, status)``: the tpu_pod.sh commands that start one run on the slice and poll it."""
    script = "launch/tpu_pod.sh"
    train = [
        script,
        "train",
        *launcher_args,
        "--config",
        plan.config,
        "--workdir",
        f"{plan.root}/{run.name}",
        "--",
        *run.args(plan.fixed),
    ]
    return train, [script, "status", *launcher_args]


def run_tpu(plan: Plan, runs: list[Run], launcher_args: list[str], poll: float) -> dict:
    summary = {
        "done": [],
        "skipped": [r.name for r in plan.runs if r not in runs],
        "failed": [],
        "stopped": [],
    }
    for run in runs:
        train_cmd, status_cmd = tpu_commands(plan, run, launcher_args)
        _log(f"starting {run.name} on the slice: {shlex.join(train_cmd)}")
        if subprocess.run(train_cmd, cwd=REPO).returncode != 0:
            summary["failed"].append(run.name)
            _log(f"FAILED to start {run.name}; stopping the sweep (rerun it to continue)")
            break
        time.sleep(poll)
        while True:
            out = subprocess.run(status_cmd, cwd=REPO, capture_output=True, text=True)
            if ": training (pid" not in out.stdout:
                break
            m = last_metrics(plan.workdir(run)) or {}
            _log(f"{run.name}: step {m.get('step', 0)}/{run.steps}")
            time.sleep(poll)
        if is_done(plan, run):
            summary["done"].append(run.name)
            _log(f"done {run.name}")
            continue
        summary["stopped"].append(run.name)
        _log(
            f"{run.name} ended short of its {run.steps} steps (preempted or failed: see launch/tpu_pod.sh "
            f"logs): {_resume_point(plan.workdir(run), run)}. Recreate the slice if it is gone and run the "
            "sweep again"
        )
        break
    return summary


# ======================================================================================================
# CLI
# ======================================================================================================
def _parser():
    p = ArgumentParser(
        prog="python -m atst_jax.sweep",
        description="Run a grid of training runs (see also: python -m atst_jax.sweep status DIR).",
    )
    p.add_argument("--config", required=True, help="config spec, e.g. configs/atst_frame.py:tiny")
    p.add_argument("--grid", default="", help="'FIELD=V1,V2; FIELD=V1,V2' (product of the axes)")
    p.add_argument("--root", required=True, help="sweep directory: DIR/sweep.json and DIR/<run>/")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--parallel", type=int, default=None, help="runs at a time (local: default 1; slurm: %%N)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and commands, start nothing (slurm: writes the plan files its script reads)",
    )
    p.add_argument("--in-process", action="store_true", help="local: train the runs in this process")
    p.add_argument(
        "--launcher-args", default="", help="extra arguments for sbatch (slurm) / tpu_pod.sh (tpu)"
    )
    p.add_argument("--poll", type=float, default=60.0, help="tpu: seconds between status polls")
    p.add_argument("--progress-every", type=float, default=60.0, help="local: seconds between progress lines")
    p.add_argument("--probe-train", default=None, help="prepared dataset for scaling.py's probe (recorded)")
    p.add_argument("--probe-test", default=None, help="its test split (recorded with --probe-train)")
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The trainer's ``--config.FIELD=VALUE`` (or ``--config.FIELD VALUE``) overrides: fixed in every run."""
    from atst_jax.config import split_overrides

    rest, fixed = split_overrides(argv)
    return rest, dict(fixed)


def plan_summary(plan: Plan) -> str:
    lines = [f"plan: {len(plan.runs)} run(s) of {plan.config} in {plan.root}"]
    for r in plan.runs:
        values = " ".join(f"{k}={v}" for k, v in r.overrides.items())
        lines.append(f"  {r.index:>3}  {r.name}  ({values or 'no grid'}; {r.steps} steps)")
    return "\n".join(lines)


def main_status(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m atst_jax.sweep status")
    p.add_argument("root", help="the sweep's --root")
    args = p.parse_args(argv)
    try:
        plan = load_plan(args.root)
        print(status_table(plan, statuses(plan)))
    except (SweepError, OSError, ImportError) as e:  # ImportError: a gs:// root without gcsfs
        return fail(e)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return main_status(argv[1:])
    try:
        rest, fixed = _split_overrides(argv)
    except UserError as e:  # ConfigError: an override without a value
        return fail(e)
    args = _parser().parse_args(rest)
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # per-run config checks warn e.g. warm-up >= steps
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        if args.parallel is not None and args.parallel < 1:
            raise SweepError(f"--parallel must be positive, got {args.parallel}")
        if args.launcher == "tpu" and not _remote(args.root):
            raise SweepError(
                f"--launcher tpu needs a gs:// --root (pod workers share no disk), got {args.root}"
            )
        if args.launcher == "tpu" and (args.parallel or 1) > 1:
            raise SweepError("--launcher tpu runs one run at a time on the slice: drop --parallel")
        if args.launcher != "local" and _remote(args.root) != (args.launcher == "tpu"):
            raise SweepError(f"--launcher {args.launcher} needs a shared filesystem --root, got {args.root}")
        if args.launcher == "local" and _remote(args.root):
            raise SweepError(f"--launcher local needs a local --root, got {args.root}")
        if args.in_process and (args.launcher != "local" or (args.parallel or 1) > 1):
            raise SweepError("--in-process is for --launcher local with one run at a time")
        if (args.probe_train is None) != (args.probe_test is None):
            raise SweepError("--probe-train and --probe-test go together")
        root = args.root if _remote(args.root) else str(Path(args.root).absolute())
        if not _remote(root) and Path(root).exists() and not Path(root).is_dir():
            raise SweepError(f"--root {args.root} is a file")
        probe = {"train": args.probe_train, "test": args.probe_test} if args.probe_train else None
        launcher_args = shlex.split(args.launcher_args)
        plan = make_plan(root, args.config, args.grid, fixed, probe)
        if not (args.dry_run and _remote(root)):
            if (_path(root) / PLAN_FILE).exists():
                old = load_plan(root)
                if old.identity() != plan.identity():
                    write_plan(plan)  # raises the one-line "holds another sweep" error
            check_ownership(plan)  # a dry run too: it shows what the real run would refuse
    except (SweepError, OSError, ImportError) as e:  # ImportError: gs:// without gcsfs installed
        return fail(e)
    # A SLURM dry run's stdout is the submission script alone (redirect it to a file and it runs).
    quiet = args.dry_run and args.launcher == "slurm"
    print(plan_summary(plan), file=sys.stderr if quiet else sys.stdout, flush=True)

    # What is left to do. A dry run of a gs:// sweep does not reach the bucket (no credentials needed).
    if args.dry_run and _remote(root):
        todo = plan.runs
    else:
        todo = [r for r in plan.runs if not is_done(plan, r)]
    if not todo:
        print(f"{_all_done(len(plan.runs))}; python -m atst_jax.scaling {root} analyses them")
        return 0

    if args.launcher == "slurm":
        script, sbatch, env = slurm_submission(plan, todo, args.parallel, launcher_args)
        try:
            # The dry run writes the plan files too: the printed script's array elements read runs.txt and
            # their train.args, so it runs as written (sbatch is what it leaves to the user).
            write_plan(plan)
        except (SweepError, OSError) as e:
            return fail(e)
        if args.dry_run:
            print(f"dry run: wrote the plan to {root}/{PLAN_FILE}; submit it with:", file=sys.stderr)
            print(script, end="")
            return 0
        (Path(root) / "logs").mkdir(exist_ok=True)
        try:
            out = subprocess.run(sbatch, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
        except FileNotFoundError:
            return fail("sbatch not found: run this on a SLURM login node (or use --dry-run)")
        if out.returncode != 0:
            return fail(f"sbatch failed (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        job = out.stdout.strip().split(";")[0]
        d = json.loads((Path(root) / PLAN_FILE).read_text())
        d["slurm_jobs"] = [*d.get("slurm_jobs", []), job]
        _write_text(Path(root) / PLAN_FILE, json.dumps(d, indent=1) + "\n")
        print(f"submitted array job {job}: {len(todo)} element(s); python -m atst_jax.sweep status {root}")
        return 0

    if args.launcher == "tpu":
        if args.dry_run:
            print(f"# dry run: would write the plan to {root}/{PLAN_FILE}, then for each run not done:")
            for run in todo:
                train_cmd, status_cmd = tpu_commands(plan, run, launcher_args)
                print(shlex.join(train_cmd))
                print(
                    f"#   then poll every {args.poll:g} s until no worker is training: {shlex.join(status_cmd)}"
                )
            return 0
        write_plan(plan)
        summary = run_tpu(plan, todo, launcher_args, args.poll)
    else:
        if args.dry_run:
            print(
                f"# dry run: would write the plan to {root}/{PLAN_FILE} and run, {args.parallel or 1} at a time:"
            )
            for run in todo:
                print(shlex.join(trainer_command(plan, run)))
            return 0
        try:
            write_plan(plan)
            root_lock = _root_lock(root)
        except (SweepError, OSError) as e:
            return fail(e)
        try:
            if args.in_process:
                summary = run_in_process(plan)
            else:
                summary = run_local(plan, args.parallel or 1, args.progress_every)
        finally:
            root_lock.close()
    print(status_table(plan, statuses(plan)))
    if summary["failed"] or summary["stopped"]:
        print(unfinished_message(summary, len(plan.runs)), file=sys.stderr)
        return 1
    print(f"{_all_done(len(plan.runs))}; python -m atst_jax.scaling {root} analyses them")
    return 0


def _all_done(total: int) -> str:
    return f"all {total} runs are done" if total > 1 else "the run is done"


def unfinished_message(summary: dict, total: int) -> str:
    """The sweep's last line when runs are left: how many, why, and that the same command finishes them."""
    failed, stopped = len(summary["failed"]), len(summary["stopped"])
    done = len(summary["done"]) + len(summary["skipped"])
    left = [f"{failed} failed"] * bool(failed) + [f"{stopped} stopped before finishing"] * bool(stopped)
    again = ["retries the failed runs"] * bool(failed) + ["resumes the stopped ones"] * bool(stopped)
    return (
        f"the sweep is not finished: {done} of {total} runs done, {', '.join(left)}. Run the same command "
        f"again: it {' and '.join(again)} from their newest checkpoints."
    )


def _root_lock(root: str):
    """One local sweep per root at a time (two would start the same runs)."""
    fh = _lock(Path(root))
    if fh is None:
        raise SweepError(f"another sweep is running in {root}")
    return fh


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
