"""A global stage's condensed input as a DuckDB table, for stages that group rows by key
(`exact_dedup`): DuckDB's hash aggregates and sorts spill to disk under the prune's working
memory limit, so finding duplicate groups across a pool holds nothing per sample in Python.

The table has the stage's condensed columns plus `_pos` (the row's place: a pool position in
the runner, an input row otherwise; ascending in input order). The prune runner streams the
condensed batches into a Parquet file and queries it on the manifest's connection
(`KeyedTable(con, "read_parquet('...')")`); `KeyedTable.of_frame` does the same for an in-memory
frame on a private connection.
"""

from __future__ import annotations

import polars as pl

POS = "_pos"


class KeyedTable:
    def __init__(self, con, source: str, n: int):
        self.con, self.source, self.n = con, source, int(n)

    @classmethod
    def of_frame(cls, frame: pl.DataFrame) -> "KeyedTable":
        """`frame` (input order) on a private in-memory DuckDB connection, `_pos` = its row."""
        import duckdb

        con = duckdb.connect()
        con.execute("SET preserve_insertion_order = false")
        con.register("_curate_frame", frame.with_row_index(POS).with_columns(pl.col(POS).cast(pl.Int64)).to_arrow())
        con.execute("CREATE TEMP TABLE _curate_keyed AS SELECT * FROM _curate_frame")
        con.unregister("_curate_frame")
        return cls(con, "_curate_keyed", frame.height)

    @property
    def columns(self) -> list[str]:
        return [d[0] for d in self.con.sql(f"SELECT * FROM {self.source} LIMIT 0").description]
