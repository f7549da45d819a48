"""Fault injection: `ingest`, `score`, `prune` and `export` are killed with SIGKILL (the whole
process group: export's shard writers and score's DataLoader workers too) at a seeded random
moment inside their work, rerun with the same command line, and the result is compared with an
uninterrupted run: every file byte for byte, the manifest table by table (tests/faultkit.py
says which columns are volatile and why).

"Inside the work": the child writes its pid into WS/.curate.lock right after it takes the
lock; the kill comes a delay drawn uniformly from [0, T) after that, T being the lock-to-exit
time of the uninterrupted reference run of the same command (or of its control rerun, when that
ran and was quicker: the machine is shared). A kill that comes after the process exited does
not count as a kill (the trial still checks the rerun).

Environment:
  CURATE_FAULT_TRIALS        trials per command, one kill each (default 2: the normal suite); N, or
                             per command: ingest=30,score=15,prune=30,export=30
  CURATE_FAULT_TRIALS_2KILL  trials per command with two kills (the first rerun is killed too;
                             default 0); same syntax
  CURATE_FAULT_SEED          seed of the kill delays (default 0)
  CURATE_FAULT_CONTROLS      commands that also get a test of an uninterrupted rerun (the control:
                             it shows the comparison's volatile columns are all accounted for):
                             `all` (make fault-trials) or e.g. `ingest,prune`; default none, for
                             time. A kill trial that finds a difference runs its control itself.
  CURATE_FAULT_DELAY         a fixed delay in seconds instead of the seeded draw (to reproduce)
  CURATE_FAULT_REPORT        append one JSON line per trial to this file (`make fault-trials`)
  CURATE_FAULT_KEEP          keep the trial directories of passing trials too (failing ones stay)

Each command has its own stage: an input workspace and a reference result prepared once per
module, copied for every trial, so a trial kills only the command under test.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import pytest

from conftest import run_cli, run_json
from faultkit import (Snapshot, compare, max_run_id, query, run_curate, runs_after, snapshot, stale_partials, tail)

COMMANDS = ("ingest", "score", "prune", "export")


def _per_command(name: str, default: int) -> dict[str, int]:
    """`N` (every command) or `ingest=N,score=M,...` (unnamed commands get `default`)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return dict.fromkeys(COMMANDS, default)
    if "=" not in raw:
        return dict.fromkeys(COMMANDS, int(raw))
    got = {k.strip(): int(v) for k, v in (part.split("=") for part in raw.split(",") if part.strip())}
    unknown = set(got) - set(COMMANDS)
    if unknown:
        raise ValueError(f"{name}: unknown command(s) {sorted(unknown)}")
    return {c: got.get(c, default) for c in COMMANDS}


TRIALS = _per_command("CURATE_FAULT_TRIALS", 2)  # one kill, then the rerun
TRIALS_2KILL = _per_command("CURATE_FAULT_TRIALS_2KILL", 0)  # two kills (the first rerun killed too)
_controls = os.environ.get("CURATE_FAULT_CONTROLS", "").strip()
CONTROLS = COMMANDS if _controls == "all" else tuple(c for c in COMMANDS if c in _controls.split(","))
SEED = int(os.environ.get("CURATE_FAULT_SEED", "0"))
FIXED_DELAY = os.environ.get("CURATE_FAULT_DELAY")
REPORT = os.environ.get("CURATE_FAULT_REPORT")
KEEP = bool(os.environ.get("CURATE_FAULT_KEEP"))
CASES = [(c, f"{i}", 1) for c in COMMANDS for i in range(TRIALS[c])] + \
        [(c, f"2k{i}", 2) for c in COMMANDS for i in range(TRIALS_2KILL[c])]

EXPORT_RECIPE = """name = "fault_export"
seed = 0
[[stages]]
stage = "image_size"
min_side = 200
[[stages]]
stage = "exact_dedup"
keys = ["uid", "sha256", "url"]
"""

# What docs/workspace.md says a killed run looks like once the command has been rerun: the next
# command that writes marks a `running` row it finds `interrupted` (its lock says that process is
# gone), and the next prune also deletes a killed prune run's decisions. `ok`: the kill came
# after the run was recorded as finished (while the manifest closed, or the interpreter exited).
KILLED_STATUS = {"interrupted", "ok"}


@dataclass
class Stage:
    command: str
    args: Callable[[Path], list]  # trial directory -> command line (workspace d/ws, output d/out)
    input_ws: Path | None  # copied into each trial; None: the command creates the workspace
    ref_dir: Path
    base_run: int  # highest run id of the input workspace
    T: float  # lock-to-exit seconds of the reference run (or of the control, when that was quicker)
    ref: Snapshot


class Bench:
    """Pools, input workspaces and reference runs, built on first use and kept for the module."""

    def __init__(self, root: Path):
        self.root = root
        self._stages: dict[str, Stage] = {}
        self.controls: dict[str, list[str]] = {}
        self._cache: dict[str, Path] = {}

    # -- shared inputs
    def wds_pool(self) -> Path:
        if "wds" not in self._cache:
            p = self.root / "pools" / "wds"
            run_cli("synth", p, "--layout", "wds", "--n", 240, "--seed", 11, "--shard-size", 30)
            self._cache["wds"] = p
        return self._cache["wds"]

    def dc_pool(self) -> Path:
        if "dc" not in self._cache:
            p = self.root / "pools" / "dc"
            run_cli("synth", p, "--layout", "datacomp", "--n", 4000, "--seed", 7, "--shard-size", 500,
                    "--dims", "32,48")
            self._cache["dc"] = p
        return self._cache["dc"]

    def dc_compressed_pool(self) -> Path:
        if "dcz" not in self._cache:
            # Deflated npz members cannot be registered in place: ingest copies them into WS/embeddings.
            p = self.root / "pools" / "dcz"
            run_cli("synth", p, "--layout", "datacomp", "--n", 1000, "--seed", 8, "--shard-size", 250,
                    "--dims", "32,48", "--compressed")
            self._cache["dcz"] = p
        return self._cache["dcz"]

    def ckpt(self) -> Path:
        if "ckpt" not in self._cache:
            import open_clip
            import torch

            from curate.models.specs import ensure_configs_registered

            ensure_configs_registered()
            torch.manual_seed(0)
            model = open_clip.create_model("curate-tiny-vit")
            path = self.root / "ckpt" / "tiny.pt"
            path.parent.mkdir(parents=True)
            torch.save(model.state_dict(), path)
            self._cache["ckpt"] = path
        return self._cache["ckpt"]

    def _input(self, name: str, build: Callable[[Path], None]) -> Path:
        ws = self.root / "inputs" / name
        if not ws.exists():
            build(ws)
        return ws

    # -- the four stages
    def _define(self, command: str) -> tuple[Callable[[Path], list], Path | None]:
        if command == "ingest":
            wds, dc, dcz = self.wds_pool(), self.dc_pool(), self.dc_compressed_pool()
            return (lambda d: ["ingest", wds, dc, dcz, "-w", d / "ws"]), None
        if command == "score":
            ckpt = self.ckpt()
            ws = self._input("wds", lambda w: run_json("ingest", self.wds_pool(), "-w", w))
            # Defaults a user runs: batch size, DataLoader workers, device auto.
            return (lambda d: ["score", "-w", d / "ws", "--model", f"curate-tiny-vit@{ckpt},name=tiny"]), ws
        if command == "prune":
            ws = self._input("dc", lambda w: run_json("ingest", self.dc_pool(), "-w", w))
            # The shipped DBP recipe: decode failures, basic, exact dedup, SemDeDup, DBP to a budget
            # (clusterings and similarities cached under WS/cache, artefacts under WS/runs/<id>/).
            return (lambda d: ["prune", "-w", d / "ws", "--pipeline", "dbp", "--budget", "0.5"]), ws

        def build_export_input(w: Path) -> None:
            run_json("ingest", self.wds_pool(), "-w", w)
            recipe = self.root / "inputs" / "fault_export.toml"
            recipe.write_text(EXPORT_RECIPE)
            run_json("prune", "-w", w, "--pipeline", recipe)

        ws = self._input("wds-pruned", build_export_input)
        # Default workers (a process pool on a machine with 2+ cores); small shards: many of them.
        return (lambda d: ["export", "-w", d / "ws", "--out", d / "out", "--shard-size", 16]), ws

    def fresh(self, command: str, name: str) -> Path:
        st = self.stage(command)
        d = self.root / "trials" / f"{command}-{name}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        if st.input_ws is not None:
            shutil.copytree(st.input_ws, d / "ws", symlinks=True)
        return d

    def stage(self, command: str) -> Stage:
        if command in self._stages:
            return self._stages[command]
        args, input_ws = self._define(command)
        d = self.root / "refs" / command
        d.mkdir(parents=True)
        if input_ws is not None:
            shutil.copytree(input_ws, d / "ws", symlinks=True)
        base = max_run_id(d / "ws")
        res = run_curate(args(d), d / "ws", d / "log")
        assert res.returncode == 0 and res.lock_seen, f"reference {command} run failed\n{tail(d / 'log')}"
        st = Stage(command, args, input_ws, d, base, res.work_s,
                   snapshot(d / "ws", base, out=d / "out", placeholder=d))
        self._stages[command] = st
        return st


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench(tmp_path_factory.mktemp("faults"))


def _record(line: dict) -> None:
    print(json.dumps(line))
    if REPORT:
        with open(REPORT, "a") as fh:
            fh.write(json.dumps(line, default=str) + "\n")


def _partway(command: str, s: dict | None) -> bool:
    """Did the rerun find part of the work done by the killed run (and do only the rest)?"""
    if not s:
        return False
    if command == "ingest":
        return s.get("shards_skipped", 0) > 0 and s.get("shards_ingested", 0) > 0
    if command == "score":
        return s.get("shards_already_done", 0) + s.get("shards_recovered", 0) > 0 and s.get("shards_scored", 0) > 0
    if command == "export":
        return bool(s.get("resumed")) and s.get("shards_written", 0) > 0
    # prune starts over, reusing the clusterings and similarities the killed run cached
    return any((f.get("stats") or {}).get(k) == "cache" for f in s.get("funnel", []) for k in ("clustering", "similarities"))


def _reproduce(command: str, trial: str) -> str:
    n = int(trial.removeprefix("2k")) + 1
    var = "CURATE_FAULT_TRIALS_2KILL" if trial.startswith("2k") else "CURATE_FAULT_TRIALS"
    return (f"reproduce: CURATE_FAULT_SEED={SEED} {var}={command}={n} .venv/bin/python -m pytest -q "
            f"tests/test_faults.py -k '{command}-{trial}]' (the delay is drawn from [0, T) with T measured in the "
            "session; CURATE_FAULT_DELAY=<seconds> forces it)")


# ---- the comparison itself --------------------------------------------------------------------

def _control(bench: Bench, command: str) -> list[str]:
    """Run the command once more, uninterrupted, on a fresh copy of its input; its differences
    from the reference (cached per module). Also lowers T to the quicker of the two runs."""
    if command in bench.controls:
        return bench.controls[command]
    st = bench.stage(command)
    d = bench.fresh(command, "control")
    res = run_curate(st.args(d), d / "ws", d / "log")
    assert res.returncode == 0, tail(d / "log")
    diffs = compare(st.ref, snapshot(d / "ws", st.base_run, out=d / "out", placeholder=d))
    _record({"kind": "control", "command": command, "identical": not diffs, "differences": diffs,
             "T": st.T, "work_s": res.work_s})
    if res.work_s:
        st.T = min(st.T, res.work_s)  # the machine is shared: the quicker of the two uninterrupted runs
    if not KEEP and not diffs:
        shutil.rmtree(d)
    bench.controls[command] = diffs
    return diffs


if CONTROLS:  # not in the normal suite (time); a failing kill trial runs its command's control itself
    @pytest.mark.parametrize("command", CONTROLS)
    def test_uninterrupted_rerun_is_identical(bench, command):
        """Control: a second uninterrupted run compares equal to the reference. This is what makes
        a difference after a kill mean something: the volatile columns are all accounted for."""
        diffs = _control(bench, command)
        assert not diffs, f"{command}: an uninterrupted rerun differs from the reference:\n" + "\n".join(diffs)


def test_comparison_catches_changes(bench):
    """The comparison is not vacuous: a flipped decision, a changed score and a changed artefact
    byte are reported; a changed clock column is not."""
    st = bench.stage("prune")
    d = bench.root / "trials" / "prune-tampered"
    shutil.copytree(st.ref_dir, d, symlinks=True)
    ws = d / "ws"
    final = st.base_run + 1
    con = duckdb.connect(str(ws / "manifest.duckdb"))
    try:
        uid = con.execute("SELECT min(uid) FROM decisions WHERE run_id = ?", [final]).fetchall()[0][0]
        con.execute("UPDATE decisions SET keep = NOT keep WHERE run_id = ? AND uid = ? AND stage_idx = 0",
                    [final, uid])
        con.execute("UPDATE scores SET score = score + 1e-7 WHERE uid = (SELECT min(uid) FROM scores)")
        con.execute("UPDATE runs SET started_at = now(), ended_at = now()")
        con.execute("UPDATE stage_stats SET seconds = seconds + 1")
    finally:
        con.close()
    art = sorted((ws / "runs" / f"{final:06d}").iterdir())[0]
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 1
    art.write_bytes(bytes(data))
    diffs = compare(st.ref, snapshot(ws, st.base_run, placeholder=st.ref_dir))  # its text names ref_dir
    assert [x.split(":")[0] for x in diffs] == ["table decisions", "table scores", f"file ws/runs/NEW/{art.name}"], diffs
    assert "first difference at byte" in diffs[-1]
    shutil.rmtree(d)


# ---- kill -9 and resume -----------------------------------------------------------------------

@pytest.mark.parametrize("command,trial,n_kills", CASES, ids=[f"{c}-{t}" for c, t, _ in CASES])
def test_kill_and_resume_is_identical(bench, command, trial, n_kills):
    st = bench.stage(command)
    d = bench.fresh(command, f"t{trial}")
    ws, args = d / "ws", st.args(d)
    t0 = time.perf_counter()
    kills = []
    for k in range(n_kills):
        rng = random.Random(f"{SEED}/{command}/{trial}/{k}")
        delay = float(FIXED_DELAY) if FIXED_DELAY else rng.uniform(0, st.T)
        before = max_run_id(ws)
        o = run_curate(args, ws, d / f"kill{k}", kill_after=delay)
        assert o.lock_seen, f"{command} never took the workspace lock\n{tail(d / f'kill{k}')}"
        assert o.orphans == 0, f"{o.orphans} processes of the killed {command} survived SIGKILL to the group"
        if not o.landed:
            assert o.returncode == 0, f"{command} failed without a kill\n{tail(d / f'kill{k}')}"
        try:  # read right after the kill (as `curate status` would), before any rerun touches it
            new = runs_after(ws, before)
        except duckdb.Error as exc:
            new = [{"run_id": None, "command": command, "status": f"unreadable: {exc}"}]
        killed_run = None
        if o.landed:
            killed_run = "none" if not new else ("ok" if new[-1]["status"] == "ok" else "during")
            assert len(new) <= 1 and (not new or new[-1]["status"] in ("running", "ok")), new
        kills.append({**o.as_dict(), "T": st.T, "fraction": delay / st.T if st.T else None,
                      "killed_run": killed_run, "run_after_kill": new[-1] if new else None})
    rerun = run_curate(args, ws, d / "rerun")
    rerun_ok = rerun.returncode == 0
    diffs: list[str] = []
    problems: list[str] = []
    stale: list[str] = []
    if rerun_ok:
        got = snapshot(ws, st.base_run, out=d / "out", placeholder=d)
        stale = stale_partials(got, st.ref, {k["pid"] for k in kills if k["landed"]})
        diffs = compare(st.ref, got)  # a temporary file a killed process left is a difference too
        # The runs the killed processes left, as docs/workspace.md describes them.
        final = got.new_runs[-1] if got.new_runs else None
        if not final or final["status"] != "ok" or final["command"] != command:
            problems.append(f"the rerun is not recorded as an ok {command} run: {got.new_runs}")
        for r in got.new_runs[:-1]:
            if r["command"] != command or r["status"] not in KILLED_STATUS:
                problems.append(f"killed run {r['run_id']} ({r['command']}): status {r['status']!r} after the "
                                f"rerun (expected one of {sorted(KILLED_STATUS)}, docs/workspace.md)")
            if command == "prune" and r["status"] == "interrupted":
                n = query(ws, "SELECT (SELECT count(*) FROM decisions WHERE run_id = $1) + "
                              "(SELECT count(*) FROM stage_stats WHERE run_id = $1)", [r["run_id"]])[0][0]
                if n:
                    problems.append(f"interrupted prune run {r['run_id']} still has {n} decision/stage rows")
        landed_with_row = sum(1 for k in kills if k["killed_run"] in ("during", "ok"))
        finished_alone = sum(1 for k in kills if not k["landed"])
        if len(got.new_runs) - 1 != landed_with_row + finished_alone:
            problems.append(f"{len(got.new_runs) - 1} earlier runs recorded, but {landed_with_row} kills landed "
                            f"after the run row was written and {finished_alone} runs finished unkilled")
        summary = query(ws, "SELECT summary FROM runs WHERE run_id = ?", [final["run_id"]])[0][0] if final else None
        leftovers = got.killed_artefacts
    else:
        summary, leftovers = None, []
    line = {"kind": "trial", "command": command, "trial": trial, "seed": SEED, "kills_per_trial": n_kills,
            "T": st.T, "kills": kills, "rerun_ok": rerun_ok, "rerun_work_s": rerun.work_s,
            "rerun_summary": json.loads(summary) if summary else None,
            "partway": _partway(command, json.loads(summary) if summary else None),
            "identical": rerun_ok and not diffs and not stale, "stale_partials": stale, "differences": diffs,
            "problems": problems, "killed_run_artefacts": leftovers,
            "seconds": round(time.perf_counter() - t0, 2), "dir": str(d)}
    _record(line)
    where = "; ".join(f"kill {i}: delay {k['delay_s']:.3f}s of T={st.T:.3f}s, "
                      + (f"landed ({k['killed_run']})" if k["landed"] else "process had already exited")
                      for i, k in enumerate(kills))
    assert rerun_ok, f"{command}: the rerun after the kill failed ({where})\n{tail(d / 'rerun')}\n" \
                     f"{_reproduce(command, trial)}"
    if diffs:
        control = _control(bench, command)
        verdict = ("an uninterrupted rerun from the same input is identical to the reference, so the kill "
                   "caused this" if not control else
                   "an uninterrupted rerun differs too (not the kill: the command or the comparison is not "
                   "deterministic):\n" + "\n".join(control))
        pytest.fail(f"{command}: after kill and rerun the workspace differs from the uninterrupted run ({where}); "
                    f"trial dir {d}\n" + "\n".join(diffs) + f"\n{verdict}\n" + _reproduce(command, trial))
    assert not problems, f"{command} ({where}):\n" + "\n".join(problems) + "\n" + _reproduce(command, trial)
    if not KEEP:
        shutil.rmtree(d)
