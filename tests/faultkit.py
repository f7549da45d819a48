"""Fault-injection machinery for tests/test_faults.py: run a real `curate` command in its own
process group, SIGKILL the whole group at a chosen moment inside the work, and compare a
workspace (every file, and the manifest table by table) with a reference.

Also a small CLI: `python tests/faultkit.py summary REPORT.jsonl` prints the table that
`make fault-trials` puts in docs/reliability.md.

What counts as volatile (left out of, or normalised before, the comparison) and why:

* `runs.started_at`, `runs.ended_at`, `shards.ingested_at`, `scorers.created_at`,
  `stage_stats.seconds`: wall-clock times.
* `runs.summary`: what the command printed; it holds timings (`seconds`, `samples_per_s`,
  `mb_per_s`) and, after a resume, what the rerun found already done (`shards_skipped`,
  `shards_recovered`, `resumed`, ...). Those differ by design; the data they describe is
  compared in its own table or file.
* every column named `run_id`: a killed run takes an id, so the rerun's id is one higher than
  the reference's. Ids of runs that existed before the command under test are kept as they
  are; ids of runs the trial made become `NEW` (so rows a killed ingest committed, which the
  rerun keeps, compare equal, while a decision row of a killed prune would be counted twice).
  Decisions and stage_stats of an earlier run of the trial that finished `ok` (the kill came
  after its `ok` was recorded, or never landed) are a complete extra run: they are dropped.
* absolute paths of the trial directory (workspace, export output) in any text value:
  replaced by `<DIR>`. Source pools and the model checkpoint live outside and are compared
  as they are; so is `shards.mtime` (the sources are shared, not copied, so it must match).
* inside `stage_stats.params` (JSON): keys ending in `seconds`; keys starting with `pass_`
  (statistics of the SemDeDup similarity pass, present only in the run that computed it);
  and the provenance values `computed` / `cache` of `clustering` and `similarities`. A rerun
  after a kill reuses the clusterings and similarities the killed run cached: the values
  must be the same, whether they were computed or read.
* `runs` rows the trial's earlier (killed) runs left: not compared with the reference; their
  status is checked against docs/workspace.md instead (`interrupted` once the rerun has
  started, and for prune no decisions left; `ok` if the kill came after the run was recorded
  as finished).
* `runs/<id>/` artefact directories of earlier runs of the trial that finished `ok`: a complete
  run's own, not compared. A killed prune run's must be gone (docs/recipes.md: the next prune
  deletes its decisions and artefacts): any left is a difference (`runs/KILLED(<id>)/...`).
* JSON text columns (`runs.argv`, `runs.params`, `shards.extra`, `scorers.params`,
  `stage_stats.params`) are compared as parsed JSON re-encoded with sorted keys.

Files compared byte for byte: every regular file under the workspace except `manifest.duckdb`
(and its `.wal`), which is compared table by table (the `.curate.sock` socket is not a regular
file); `runs/<id>/` is renamed `runs/NEW/` for the run under test; every file under the export
output directory. `stale_partials` picks out the files only a trial has that are a killed
process's temporary files, named in the trial report (each is also a difference: the writer lock's
`Workspace.remove_partials` must have removed it).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
CURATE = [sys.executable, "-m", "curate"]
LOCK_NAME = ".curate.lock"

VOLATILE = {
    "runs": {"started_at", "ended_at", "summary"},
    "shards": {"ingested_at"},
    "scorers": {"created_at"},
    "stage_stats": {"seconds"},
}
JSON_COLUMNS = {("runs", "argv"), ("runs", "params"), ("stage_stats", "params"), ("shards", "extra"),
                ("scorers", "params")}
PER_RUN_TABLES = {"decisions", "stage_stats"}  # rows a rerun repeats, not resumes
PROVENANCE_KEYS = {"clustering", "similarities"}
PROVENANCE_VALUES = {"computed", "cache"}
NEW = "NEW"


# ---- running and killing -------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """One process: its exit code, when it took the workspace lock, and (for a kill) where the
    kill landed."""
    argv: list[str]
    pid: int
    returncode: int
    lock_seen: bool
    startup_s: float | None  # from spawn to the lock appearing
    work_s: float | None  # from the lock appearing to exit (None when killed)
    delay_s: float | None = None  # the kill's delay after the lock appeared
    kill_sent: bool = False
    landed: bool = False  # the process was still running and died of the SIGKILL
    orphans: int = 0  # group members still alive 10 s after the kill (must be 0)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _lock_holder(ws: Path) -> int | None:
    try:
        text = (ws / LOCK_NAME).read_text()
    except OSError:
        return None
    try:
        return int(json.loads(text).get("pid"))
    except (ValueError, TypeError, AttributeError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            pids.append(int(d))
    return pids


def run_curate(args: list, ws: Path, log: Path, *, kill_after: float | None = None, env: dict | None = None,
               timeout: float = 600, poll: float = 0.003) -> Outcome:
    """Run `python -m curate ARGS` in a new process group (stdout/stderr to LOG.out/.err).

    Polls WS/.curate.lock until it names the child's pid: from then on the command is inside
    its work (the lock is taken right after start-up). With `kill_after`, sleeps that many
    seconds more and sends SIGKILL to the whole group (the command's worker processes too),
    unless the process has already exited."""
    argv = [*CURATE, *map(str, args)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            t_lock = None
            deadline = t0 + timeout
            while proc.poll() is None and time.perf_counter() < deadline:
                if _lock_holder(ws) == proc.pid:
                    t_lock = time.perf_counter()
                    break
                time.sleep(poll)
            res = Outcome(argv=[str(a) for a in args], pid=proc.pid, returncode=0, lock_seen=t_lock is not None,
                          startup_s=None if t_lock is None else t_lock - t0, work_s=None)
            if kill_after is not None and t_lock is not None:
                res.delay_s = kill_after
                # Sleep, then look: Popen.wait(timeout) polls at up to 50 ms intervals, too coarse.
                while proc.poll() is None:
                    left = t_lock + kill_after - time.perf_counter()
                    if left <= 0:
                        res.kill_sent = True
                        with _suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        break
                    time.sleep(min(left, 0.25))
            rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except BaseException:
            with _suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        t_end = time.perf_counter()
    res.returncode = rc
    res.landed = res.kill_sent and rc == -signal.SIGKILL
    if res.kill_sent:
        stop = time.time() + 10
        while group_members(proc.pid) and time.time() < stop:
            time.sleep(0.05)
        res.orphans = len(group_members(proc.pid))
    elif t_lock is not None:
        res.work_s = t_end - t_lock
    return res


class _suppress:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, typ, val, tb):
        return typ is not None and issubclass(typ, self.exc)


def tail(log: Path, n: int = 30) -> str:
    parts = []
    for suffix in (".out", ".err"):
        p = log.with_suffix(suffix)
        if p.exists():
            lines = p.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {p.name} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


# ---- what the manifest says about runs -------------------------------------------------------

def query(ws: Path, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        return con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()
    finally:
        con.close()


def max_run_id(ws: Path) -> int:
    runs = runs_after(ws, -1)
    return runs[-1]["run_id"] if runs else 0


def runs_after(ws: Path, base: int) -> list[dict]:
    """Runs above `base`, oldest first ([] when a kill came before the manifest had its tables)."""
    if not (ws / "manifest.duckdb").exists():
        return []
    if not query(ws, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'")[0][0]:
        return []
    rows = query(ws, "SELECT run_id, command, status, error FROM runs WHERE run_id > ? ORDER BY run_id", [base])
    return [dict(zip(("run_id", "command", "status", "error"), r)) for r in rows]


# ---- snapshots and comparison ---------------------------------------------------------------

def _canon(v):
    if isinstance(v, float):
        return "nan" if v != v else v.hex()
    if isinstance(v, (bytes, bytearray)):
        return hashlib.sha256(v).hexdigest()
    if v is None or isinstance(v, (int, str, bool)):
        return v
    return str(v)


def _strip_json(obj, table: str):
    """JSON text, re-encoded with sorted keys; in stage_stats.params without timings, without the
    similarity pass's statistics, and with `computed`/`cache` provenance merged."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if table == "stage_stats":
                if k.endswith("seconds") or k.startswith("pass_"):
                    continue
                if k in PROVENANCE_KEYS and v in PROVENANCE_VALUES:
                    v = "computed|cache"
            out[k] = _strip_json(v, table)
        return out
    if isinstance(obj, list):
        return [_strip_json(v, table) for v in obj]
    return obj


@dataclasses.dataclass
class Snapshot:
    tables: dict[str, tuple[list[str], list[tuple]]]  # name -> (columns, sorted normalised rows)
    files: dict[str, tuple[int, str, Path]]  # relative name -> (size, sha256, real path)
    new_runs: list[dict]  # runs the trial made, in order (the last is the run under test)
    killed_artefacts: list[str]  # files under runs/<id>/ of killed runs of the trial (must be none)


def _hash(p: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return p.stat().st_size, h.hexdigest()


def snapshot(ws: Path, base_run: int, *, out: Path | None = None, placeholder: Path | None = None) -> Snapshot:
    """Everything the comparison looks at, normalised. `base_run`: the highest run id of the
    input workspace (runs above it were made by the command under test). `placeholder`: the
    trial's own directory, replaced by `<DIR>` in every text value."""
    runs = runs_after(ws, base_run)
    final = runs[-1]["run_id"] if runs else None
    earlier = {r["run_id"]: r["status"] for r in runs[:-1]}
    prefix = str(placeholder) if placeholder is not None else None

    def text(s: str) -> str:
        return s.replace(prefix, "<DIR>") if prefix else s

    def norm_run(v):
        return v if v is None or v <= base_run else NEW

    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    tables: dict[str, tuple[list[str], list[tuple]]] = {}
    try:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1").fetchall()]
        for t in names:
            cols = [r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' AND table_name = ? "
                "ORDER BY ordinal_position", [t]).fetchall()]
            keep = [c for c in cols if c not in VOLATILE.get(t, set())]
            rows = con.execute(f'SELECT {", ".join(f"{chr(34)}{c}{chr(34)}" for c in keep)} FROM "{t}"').fetchall()
            ri = keep.index("run_id") if "run_id" in keep else None
            normed = []
            for row in rows:
                if ri is not None and row[ri] is not None and row[ri] > base_run:
                    rid = row[ri]
                    if t == "runs" and rid != final:
                        continue  # an earlier (killed) run of the trial: checked on its own
                    if t in PER_RUN_TABLES and rid != final and earlier.get(rid) == "ok":
                        continue  # a complete earlier run (the kill came after it finished)
                    if t in PER_RUN_TABLES and rid != final:
                        row = list(row)
                        row[ri] = f"KILLED({rid})"  # must not exist: shows up as a difference
                        row = tuple(row)
                vals = []
                for c, v in zip(keep, row):
                    if c == "run_id" and isinstance(v, int):
                        v = norm_run(v)
                    elif isinstance(v, str):
                        v = text(v)
                        if (t, c) in JSON_COLUMNS:
                            try:
                                v = json.dumps(_strip_json(json.loads(v), t), sort_keys=True)
                            except ValueError:
                                pass
                    vals.append(_canon(v))
                normed.append(tuple(vals))
            normed.sort(key=repr)
            tables[t] = (keep, normed)
    finally:
        con.close()

    files: dict[str, tuple[int, str, Path]] = {}
    killed_artefacts: list[str] = []
    for p in sorted(ws.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(ws).as_posix()
        if rel in ("manifest.duckdb", "manifest.duckdb.wal"):
            continue
        parts = rel.split("/")
        if parts[0] == "runs" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) > base_run:
            rid = int(parts[1])
            if rid != final:
                if earlier.get(rid) == "ok":  # a complete earlier run's artefacts are its own
                    continue
                # docs/recipes.md: the next prune deletes a killed run's artefacts. Must not exist.
                killed_artefacts.append(rel)
                rel = "/".join(["runs", f"KILLED({rid})", *parts[2:]])
            else:
                rel = "/".join(["runs", NEW, *parts[2:]])
        files["ws/" + rel] = (*_hash(p), p)
    if out is not None and out.exists():
        for p in sorted(out.rglob("*")):
            if p.is_file():
                files["out/" + p.relative_to(out).as_posix()] = (*_hash(p), p)
    return Snapshot(tables, files, runs, killed_artefacts)


_PARTIAL = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.partial(\.\w+)?$|^(?P<final2>.+)\.partial\.npy$")


def stale_partials(snap: Snapshot, ref: Snapshot, pids: set[int]) -> list[str]:
    """Files only in `snap` that are a killed process's temporary file: `.NAME.PID.partial[.EXT]`
    (curate.workspace.atomic_path) with PID one of `pids`, or `NAME.partial.npy` (ingest's copy of
    a DataComp npz member). Nothing removes them on the rerun (see docs/reliability.md)."""
    out = []
    for name in snap.files:
        if name in ref.files:
            continue
        m = _PARTIAL.match(name.rsplit("/", 1)[-1])
        if m and (m.group("final2") is not None or int(m.group("pid")) in pids):
            out.append(name)
    return out


def _first_diff(a: Path, b: Path) -> str:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 16), fb.read(1 << 16)
            if x != y:
                n = min(len(x), len(y))
                i = next((j for j in range(n) if x[j] != y[j]), n)
                return f"first difference at byte {off + i}"
            if not x:
                return "no difference"
            off += len(x)


def compare(ref: Snapshot, got: Snapshot, *, show: int = 3) -> list[str]:
    """Human-readable differences between a reference and a trial snapshot ([] when equal)."""
    diffs: list[str] = []
    for t in sorted(set(ref.tables) | set(got.tables)):
        if t not in ref.tables or t not in got.tables:
            diffs.append(f"table {t}: only in {'trial' if t in got.tables else 'reference'}")
            continue
        (rc, rrows), (gc, grows) = ref.tables[t], got.tables[t]
        if rc != gc:
            diffs.append(f"table {t}: columns differ: reference {rc}, trial {gc}")
            continue
        if rrows == grows:
            continue
        only_ref = collections.Counter(rrows) - collections.Counter(grows)
        only_got = collections.Counter(grows) - collections.Counter(rrows)
        lines = [f"table {t}: {len(rrows)} rows in the reference, {len(grows)} in the trial; "
                 f"{sum(only_ref.values())} only in the reference, {sum(only_got.values())} only in the trial "
                 f"(columns {rc})"]
        for label, cnt in (("reference", only_ref), ("trial", only_got)):
            for row in sorted(cnt, key=repr)[:show]:
                lines.append(f"    only in {label}: {row}" + (f" x{cnt[row]}" if cnt[row] > 1 else ""))
        diffs.append("\n".join(lines))
    for name in sorted(set(ref.files) | set(got.files)):
        a, b = ref.files.get(name), got.files.get(name)
        if a is None or b is None:
            diffs.append(f"file {name}: only in the {'trial' if a is None else 'reference'}"
                         f" ({(b or a)[0]} bytes)")
        elif a[:2] != b[:2]:
            diffs.append(f"file {name}: differs (reference {a[0]} bytes, trial {b[0]} bytes; "
                         f"{_first_diff(a[2], b[2])})")
    return diffs


# ---- the summary table ------------------------------------------------------------------------

def summary_table(lines: list[dict]) -> str:
    """Markdown table of trial records (one dict per trial, as test_faults writes them)."""
    order = ["ingest", "score", "prune", "export"]
    by: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in lines:
        if r.get("kind") == "trial":
            by[(r["command"], r["kills_per_trial"])].append(r)
    rows = ["| command | kills per trial | trials | kills sent | kills landed | ... before the run row | "
            "... during the run | ... after it was `ok` | rerun resumed part-way | rerun exit 0 first time | "
            "identical | identical but for a stale `.partial` file | T (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (cmd, kpt), rs in sorted(by.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9,
                                                              kv[0][1])):
        kills = [k for r in rs for k in r["kills"]]
        landed = [k for k in kills if k["landed"]]
        where = collections.Counter(k.get("killed_run") or "none" for k in landed)
        ts = sorted(r["T"] for r in rs)
        rows.append(f"| {cmd} | {kpt} | {len(rs)} | {sum(k['kill_sent'] for k in kills)} | {len(landed)} | "
                    f"{where['none']} | {where['during']} | {where['ok']} | {sum(bool(r.get('partway')) for r in rs)} | "
                    f"{sum(r['rerun_ok'] for r in rs)}/{len(rs)} | {sum(r['identical'] for r in rs)}/{len(rs)} | "
                    f"{sum(bool(r.get('stale_partials')) and not r['differences'] for r in rs)} | "
                    f"{ts[len(ts) // 2]:.2f} |")
    controls = [r for r in lines if r.get("kind") == "control"]
    if controls:
        rows.append("")
        rows.append("Uninterrupted reruns (controls): " + ", ".join(
            f"{r['command']} {'identical' if r['identical'] else 'DIFFERENT'}" for r in controls))
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "summary":
        print("usage: python tests/faultkit.py summary REPORT.jsonl", file=sys.stderr)
        return 2
    lines = [json.loads(l) for l in Path(argv[1]).read_text().splitlines() if l.strip()]
    print(summary_table(lines))
    for r in lines:
        if r.get("kind") != "trial" or (r["identical"] and not r.get("problems")):
            continue
        k = "; ".join(f"delay {x['delay_s']:.3f}s of T={r['T']:.3f}s" + (f" ({x['killed_run']})" if x["landed"] else
                                                                          " (not landed)") for x in r["kills"])
        print(f"\nNOT IDENTICAL: {r['command']} trial {r['trial']} (seed {r['seed']}; {k}):",
              *r.get("stale_partials", []), *r["differences"][:5], *r.get("problems", []), sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
