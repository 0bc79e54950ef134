"""External embeddings (audiohash.external), no Spark: layouts, pieces, the clip_id plan and the
row checks, on small hand-made files."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiohash import external
from audiohash.errors import AudiohashError


def rows_of(source, taken=frozenset(), rows_per_piece=external.ROWS_PER_PIECE, dim=None):
    """Run the whole pure path over ``source``: (embedded rows, rejects) as DataFrames, and skipped."""
    pieces = external.list_pieces(source, external.input_layout(source), rows_per_piece)
    ids = {f: external.read_clip_ids(f) for f in dict.fromkeys(p.ids_file for p in pieces)}
    excluded, rejects, skipped = external.plan_rows(pieces, ids, set(taken))
    dim = dim or external.first_dimension(pieces)
    out = pd.concat([external.external_rows(p, excluded.get(k), dim).to_pandas() for k, p in enumerate(pieces)],
                    ignore_index=True)
    bad = out["reject_reason"].notna()
    return out[~bad].reset_index(drop=True), pd.concat([rejects, out.loc[bad, rejects.columns]], ignore_index=True), skipped


def test_parquet_rows_checked_for_dimension_nan_and_missing(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    emb = [list(v) for v in x]
    emb[1], emb[2], emb[3] = [1.0, 2.0, 3.0], None, [0.0, np.inf, 0.0, 0.0]
    pq.write_table(pa.table({"clip_id": [f"c{i}" for i in range(6)], "embedding": emb,
                             "label": [7, None, 1, 2, 3, 4], "split": ["db"] * 5 + ["query"], "extra": range(6)}),
                   tmp_path / "e.parquet", row_group_size=2)
    assert external.input_layout(str(tmp_path / "e.parquet")) == "parquet"
    ok, rejects, skipped = rows_of(str(tmp_path / "e.parquet"), rows_per_piece=3)
    assert ok["clip_id"].tolist() == ["c0", "c4", "c5"] and skipped == 0
    np.testing.assert_array_equal(np.stack(ok["embedding"]), x[[0, 4, 5]].astype(np.float32))
    assert ok["label"].tolist() == ["7", "3", "4"] and ok["split"].tolist() == ["db", "db", "query"]
    assert ok["offset_s"].eq(0.0).all() and ok["n_windows"].eq(1).all() and ok["path"].isna().all()
    assert dict(zip(rejects["clip_id"], rejects["reject_reason"])) == {
        "c1": "dimension", "c2": "missing_embedding", "c3": "nan_embedding"}
    where = f"file:{tmp_path}/e.parquet#row="
    assert rejects["path"].tolist() == [where + "1", where + "2", where + "3"]
    message = rejects.set_index("clip_id")["reject_message"]
    assert "row 1" in message["c1"] and "3 values" in message["c1"] and "have 4" in message["c1"]


def test_duplicates_reject_every_copy_and_taken_ids_are_skipped(tmp_path):
    rng = np.random.default_rng(0)
    for name, ids in (("a", ["x", "y", "dup", "old"]), ("b", ["dup", None, "z", ""])):
        pq.write_table(pa.table({"clip_id": ids, "embedding": [list(v) for v in rng.normal(size=(4, 3))]}),
                       tmp_path / f"{name}.parquet")
    (tmp_path / "_SUCCESS").write_text("")  # Spark's marker: ignored
    assert external.input_layout(str(tmp_path)) == "parquet"
    ok, rejects, skipped = rows_of(str(tmp_path), taken={"old"})
    assert sorted(ok["clip_id"]) == ["x", "y", "z"] and skipped == 1
    assert sorted(zip(rejects["reject_reason"], rejects["path"].str.rsplit("/", n=1).str[1])) == [
        ("duplicate_clip_id", "a.parquet#row=2"), ("duplicate_clip_id", "b.parquet#row=0"),
        ("missing_clip_id", "b.parquet#row=1"), ("missing_clip_id", "b.parquet#row=3")]
    assert "appears 2 times" in rejects["reject_message"].iloc[-1]


def test_npy_layout_pairs_matrices_with_parquet_by_name(tmp_path):
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    np.save(tmp_path / "part0.npy", x[:3])
    np.save(tmp_path / "part1.npy", x[3:].astype(np.float16))
    pq.write_table(pa.table({"clip_id": ["a", "b", "c"], "label": ["l1", "l2", "l1"]}), tmp_path / "part0.parquet")
    pq.write_table(pa.table({"clip_id": ["d", "e"], "path": ["/audio/d.wav", None]}), tmp_path / "part1.parquet")
    assert external.input_layout(str(tmp_path)) == "npy"
    ok, rejects, _ = rows_of(str(tmp_path))
    assert ok["clip_id"].tolist() == list("abcde") and rejects.empty
    assert ok["label"].tolist() == ["l1", "l2", "l1", None, None] and ok["path"].tolist()[3:] == ["/audio/d.wav", None]
    np.testing.assert_allclose(np.stack(ok["embedding"]), x, atol=2e-3)  # part1 went through float16

    np.save(tmp_path / "part2.npy", np.zeros((2, 4), np.float32))  # another dimension: its rows rejected
    pq.write_table(pa.table({"clip_id": ["f", "g"]}), tmp_path / "part2.parquet")
    ok, rejects, _ = rows_of(str(tmp_path))
    assert len(ok) == 5 and rejects["reject_reason"].tolist() == ["dimension", "dimension"]


def test_npy_layout_errors_name_the_file(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(AudiohashError, match=r"e\.npy: no e\.parquet beside it"):
        external.list_pieces(str(tmp_path), "npy")
    pq.write_table(pa.table({"clip_id": ["a", "b"]}), tmp_path / "e.parquet")
    with pytest.raises(AudiohashError, match=r"e\.npy: 3 rows, but .*e\.parquet has 2"):
        external.list_pieces(str(tmp_path), "npy")
    np.save(tmp_path / "e.npy", np.zeros(2, np.float32))
    with pytest.raises(AudiohashError, match="expected a 2-D numeric matrix"):
        external.list_pieces(str(tmp_path), "npy")


def test_missing_columns_and_non_embedding_inputs(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "embedding": [[1.0, 2.0]]}), tmp_path / "e.parquet")
    with pytest.raises(AudiohashError, match=r"e\.parquet: no 'clip_id' column \(columns: \['id', 'embedding'\]\)"):
        external.read_clip_ids(str(tmp_path / "e.parquet"))
    pq.write_table(pa.table({"clip_id": ["a"], "embedding": [["x", "y"]]}), tmp_path / "s.parquet")
    with pytest.raises(AudiohashError, match=r"s\.parquet: column 'embedding' is list<.*string>; expected a list of num"):
        external.list_pieces(str(tmp_path / "s.parquet"), "parquet")
    # An audio manifest (no embedding column), a CSV, a folder of audio, a missing path: not embeddings.
    pq.write_table(pa.table({"path": ["a.wav"]}), tmp_path / "m.parquet")
    (tmp_path / "audio" / "dog").mkdir(parents=True)
    (tmp_path / "m.csv").write_text("path\na.wav\n")
    for source in ("m.parquet", "m.csv", "audio", "absent"):
        assert external.input_layout(str(tmp_path / source)) is None
    with pytest.raises(AudiohashError, match="external_version is empty"):
        external.extractor_version(" ")
    assert external.extractor_version("clap-2023") == "external-clap-2023"


def test_fixed_size_lists_and_pieces_cover_every_row_once(tmp_path):
    x = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3)
    pq.write_table(pa.table({"clip_id": [str(i) for i in range(50)], "embedding": column}), tmp_path / "f.parquet",
                   row_group_size=7)
    pieces = external.list_pieces(str(tmp_path / "f.parquet"), "parquet", rows_per_piece=15)
    assert [(p.start, p.stop) for p in pieces] == [(0, 14), (14, 28), (28, 42), (42, 50)]
    assert external.first_dimension(pieces) == 3
    ok, rejects, _ = rows_of(str(tmp_path / "f.parquet"), rows_per_piece=15)
    assert rejects.empty and ok["clip_id"].tolist() == [str(i) for i in range(50)]
    np.testing.assert_array_equal(np.stack(ok["embedding"]), x)
