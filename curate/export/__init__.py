"""Export a selection (a prune run's result, or the state after one of its stages) as

* `wds`      webdataset shards `00000000.tar, 00000001.tar, ...` whose members are the source
             tar members copied byte for byte (`curate.export.wds`);
* `datacomp` a DataComp submission, the sorted `np.dtype("u8,u8")` uid array (`curate.export.datacomp`);
* `parquet`  one table of the kept samples with metadata, scores and clusters (`curate.export.parquet`).

docs/export.md describes the formats and guarantees. This package's `__init__` stays free of
heavy imports: export worker processes import `curate.export.wds` and `curate.export.tario` only.
"""

FORMATS = ("wds", "datacomp", "parquet")
