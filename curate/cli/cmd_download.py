"""`curate download`: fetch a URL table's images with img2dataset, then ingest the shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..errors import UsageError
from ..manifest import open_manifest
from ..workspace import Workspace
from .common import DebugOpt, JsonOpt, QuietOpt, WorkspaceOpt, setup
from .main import app


def _parse_extra(options: list[str]) -> dict:
    """--option KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, true, lists), else a string."""
    extra = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE (an img2dataset.download argument)")
        try:
            extra[key.strip()] = json.loads(value)
        except ValueError:
            extra[key.strip()] = value
    return extra


@app.command()
def download(
    urls: Annotated[Path, typer.Argument(help="URL table: .parquet/.csv/.tsv/.jsonl/.json/.txt (optionally .gz), "
                                              "or a folder of .parquet tables. Columns: url (or URL, image_url), "
                                              "caption (or text, TEXT, alt), optional uid.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards (img2dataset's NNNNN.tar + "
                                                          "NNNNN.parquet + NNNNN_stats.json).", show_default=False)],
    workspace: WorkspaceOpt = None,
    processes: Annotated[Optional[int], typer.Option(help="Download processes (default: CPU count).",
                                                     show_default=False)] = None,
    threads: Annotated[int, typer.Option(help="Download threads per process.")] = 128,
    timeout: Annotated[float, typer.Option(help="Seconds before a request gives up.")] = 10,
    retries: Annotated[int, typer.Option(help="Extra attempts for a URL that failed to download.")] = 2,
    image_size: Annotated[int, typer.Option(help="Resize target in pixels (DataComp: 512).")] = 512,
    resize_mode: Annotated[str, typer.Option(help="img2dataset resize mode; keep_ratio_largest bounds the longer "
                                                  "side (DataComp). Also: no, keep_ratio, center_crop, border.")]
    = "keep_ratio_largest",
    resize_only_if_bigger: Annotated[bool, typer.Option("--resize-only-if-bigger/--always-resize",
                                                        help="Leave images already within --image-size alone.")]
    = True,
    encode_format: Annotated[str, typer.Option(help="jpg | png | webp.")] = "jpg",
    encode_quality: Annotated[int, typer.Option(help="JPEG/WebP quality (PNG: compression 0-9).")] = 95,
    samples_per_shard: Annotated[int, typer.Option(help="URLs per shard.")] = 10_000,
    shard_digits: Annotated[Optional[int], typer.Option(help="Digits in shard names (default: 8 for DataComp "
                                                             "metadata, as DataComp's download; else 5).",
                                                        show_default=False)] = None,
    hash_name: Annotated[str, typer.Option("--hash", help="Hash of the downloaded bytes: sha256 | md5 | sha512 | "
                                                          "none.")] = "sha256",
    exif: Annotated[bool, typer.Option("--exif/--no-exif", help="Keep EXIF tags in each sample's json.")] = True,
    blur_faces: Annotated[Optional[bool], typer.Option("--blur-faces/--no-blur-faces",
                                                       help="Blur the boxes of a `face_bboxes` column, as DataComp's "
                                                            "download does (default: when the table has one).",
                                                       show_default=False)] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Another img2dataset.download argument, "
                                                        "KEY=VALUE (repeatable), e.g. min_image_size=200.",
                                                        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete what an earlier download left in --out "
                                                                "and start again.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Download a URL table's images into webdataset shards and ingest them into the workspace.

    Defaults are DataComp's: longer side at most 512 px (keep ratio, only if larger), jpg,
    10,000 samples per shard, sha256 of the downloaded bytes, each sample's json carrying the
    uid, faces blurred where the table has `face_bboxes`. Every URL becomes a sample (pending
    until downloaded); each failed URL is recorded in `sample_issues` with img2dataset's status
    and error. Rerunning the same command resumes: finished shards are neither downloaded nor
    ingested again.

    A DataComp metadata folder (NNNNNNNN.parquet + .npz, columns url, text, uid) is ingested as
    DataComp metadata first (embeddings and CLIP scores included); each downloaded image is then
    attached to its metadata sample by uid, and a failed download leaves the sample metadata
    only, with img2dataset's status as a `download_failed` warning.

    Examples:
      `curate download urls.parquet -w ws/ --out shards/ --processes 4 --threads 64`
      `curate download datacomp/metadata/ -w ws/ --out datacomp/shards/`
    """
    setup(json_output, quiet, debug)
    from ..sources.detect import expand_sources
    from ..sources.download import download_urls
    from ..sources.ingest import ingest_paths
    from ..sources.urls import read_url_table

    units = expand_sources([urls], None) if urls.exists() else []
    datacomp = bool(units) and all(u.format == "datacomp" for u in units)

    extra = _parse_extra(option or [])
    params = {
        "urls": str(urls.expanduser().absolute()), "out": str(out.expanduser().absolute()),
        "processes": processes, "threads": threads, "timeout": timeout, "retries": retries,
        "image_size": image_size, "resize_mode": resize_mode, "resize_only_if_bigger": resize_only_if_bigger,
        "encode_format": encode_format, "encode_quality": encode_quality, "samples_per_shard": samples_per_shard,
        "hash": hash_name, "exif": exif, "blur_faces": blur_faces, "shard_digits": shard_digits, "options": extra, "overwrite": overwrite,
        "source_format": "datacomp" if datacomp else "urls",
    }
    compute_hash = None if hash_name.lower() in ("none", "") else hash_name.lower()

    ws = Workspace.open(workspace, write=True, create=True)
    try:
        with open_manifest(ws) as m:
            with m.run("download", params) as rec:
                table = read_url_table(urls)
                console.info(f"{table.path.name}: {table.n_rows:,} rows, {table.n_samples:,} URLs to fetch"
                             + (f", {table.issues_df.height:,} rejected" if table.issues_df.height else ""))
                if datacomp:
                    # The metadata samples first (with their embeddings and scores); each downloaded
                    # image then attaches to its sample by uid.
                    registered = ingest_paths(ws, m, [urls], "datacomp", rec.run_id)
                    # only the rows that are samples now (a row ingest rejected, e.g. for a blank
                    # uid the URL table would derive one for, is not downloaded)
                    table = dataclasses.replace(table, frame=table.frame.join(
                        m.frame("SELECT uid FROM samples WHERE source = 'datacomp'"), on="uid", how="semi",
                        maintain_order="left"))
                else:
                    # Every URL becomes a pending sample first (table-level problems go to
                    # sample_issues); the downloaded shards then attach to them, failed downloads
                    # mark them failed.
                    registered = ingest_paths(ws, m, [table.path], "urls", rec.run_id)
                bbox_col = None
                if blur_faces is not False:
                    table, bbox_col = with_face_boxes(table, required=bool(blur_faces))
                result = download_urls(
                    table, out, processes=processes, threads=threads, image_size=image_size,
                    resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
                    encode_format=encode_format, encode_quality=encode_quality,
                    number_sample_per_shard=samples_per_shard, compute_hash=compute_hash, extract_exif=exif,
                    retries=retries, timeout=timeout, overwrite=overwrite, extra=extra, bbox_col=bbox_col,
                    shard_digits=shard_digits or (8 if datacomp else 5))
                ingested = ingest_paths(ws, m, result.shards, "wds", rec.run_id, replace=overwrite) \
                    if result.shards else None
                summary = {
                    "run_id": rec.run_id,
                    "table_rows": table.n_rows,
                    "rejected_rows": table.issues_df.height,
                    "rejected_by_reason": table.issue_counts(),
                    **result.summary(),
                    "samples_added": (ingested.samples_added if ingested else 0),
                    "samples_attached": (ingested.samples_attached if ingested else 0),
                    "images_attached": (ingested.images_attached if ingested else 0),
                    "images_mismatched": (ingested.images_mismatched if ingested else 0),
                    "faces_blurred_by": bbox_col,
                    "shards_ingested": (ingested.shards_ingested if ingested else 0),
                    "shards_skipped": (ingested.shards_skipped if ingested else 0),
                    "shards_failed": (ingested.shards_failed if ingested else 0),
                    "table": ("ingested" if registered.shards_ingested else "already in the workspace")
                    + (" (DataComp metadata)" if datacomp else ""),
                    "seconds": result.seconds,
                }
                rec.summary = summary
            summary["samples_in_workspace"] = m.scalar("SELECT count(*) FROM samples")
    finally:
        ws.close()
    console.emit(summary, title="download")
    if result.missing_shards:
        console.warn(f"{len(result.missing_shards)} shard(s) did not finish (img2dataset gave up on them); "
                     f"their URLs stay pending: rerun the same command to retry them. Log: {result.log_path}")
        raise typer.Exit(1)
    if ingested is not None and ingested.shards_failed:
        raise typer.Exit(1)


FACE_BOXES = "face_bboxes"  # DataComp metadata's column (img2dataset's bbox_col in DataComp's download)


def with_face_boxes(table, *, required: bool):
    """(table, bbox column or None): the table's frame with its files' `face_bboxes` joined on by
    key, when they have that column."""
    import polars as pl

    from ..sources.urls import _list_files

    files, folder = _list_files(table.path)
    if table.format != "parquet" or not all(FACE_BOXES in pl.read_parquet_schema(f) for f in files):
        if required:
            raise UsageError(f"--blur-faces: {table.path} has no {FACE_BOXES!r} column in every file")
        return table, None
    parts = [pl.read_parquet(f, columns=[FACE_BOXES]).with_row_index("_row").select(
        (pl.lit(f"{f.name}:" if folder else "") + pl.col("_row").cast(pl.Utf8)).alias("key"), FACE_BOXES)
        for f in files]
    boxes = pl.concat(parts) if len(parts) > 1 else parts[0]
    return dataclasses.replace(table, frame=table.frame.join(boxes, on="key", how="left", maintain_order="left")), \
        FACE_BOXES
