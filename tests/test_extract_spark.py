"""The extract job on real local Spark + Delta: a corrupted input set fully accounted for, parity
with the in-process worker and between the two ways of reading bytes, incremental reruns, a
folder tree through the job entry point, and a TorchScript model written here."""
import hashlib
import io
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import make_config, run_job_main

from audiohash.extraction import embed_files, manifest_inputs
from audiohash.features import make_extractor

pytestmark = [pytest.mark.spark, pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]
SR = 16000


def tone(seconds: float, sr: int = SR, freq: float = 330.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * np.sin(2 * np.pi * 3 * freq * t)).astype(np.float32)


def rendered(small_manifest, n: int) -> list[str]:
    """Paths of n real rendered clips of the small GM dataset, of different classes."""
    rows = pd.read_csv(small_manifest).groupby("label").head(1).head(n)
    return [str(small_manifest.parent / p) for p in rows["path"]]


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory, small_manifest):
    """A folder of real clips and broken files, its manifest, and what each file should become."""
    d = tmp_path_factory.mktemp("corrupt")
    expect = {}
    for i, src in enumerate(rendered(small_manifest, 6)):
        shutil.copy(src, d / f"real{i}.wav")
        expect[f"real{i}"] = None
    pcm = io.BytesIO()
    sf.write(pcm, tone(2.0), SR, format="WAV", subtype="PCM_16")
    (d / "trunc_body.wav").write_bytes(pcm.getvalue()[:44 + 2 * int(1.2 * SR)])  # 1.2 s left: embedded
    (d / "trunc_header.wav").write_bytes(pcm.getvalue()[:30])
    (d / "zero.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is a text file named .wav\n" * 20)
    nan = tone(2.0)
    nan[:] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "silent.wav", np.zeros(2 * SR, np.float32), SR, subtype="PCM_16")
    sf.write(d / "multi.flac", np.stack([tone(2.5, 44100, 330.0 * (1 + k / 8)) for k in range(8)], 1), 44100)
    sf.write(d / "long.wav", tone(600.0), SR, subtype="PCM_16")  # ten minutes: 300 windows
    expect.update({"trunc_body": None, "trunc_header": "unreadable", "zero": "empty", "text": "unsupported_format",
                   "nan": "nan_samples", "silent": "all_silent", "multi": None, "long": None, "absent": "missing"})
    suffix = {"multi": ".flac"}
    manifest = pd.DataFrame({"path": [f"{k}{suffix.get(k, '.wav')}" for k in expect], "label": "lab",
                             "split": "db"})
    manifest.to_csv(d / "manifest.csv", index=False)
    return d / "manifest.csv", expect


def read(spark, path):
    return spark.read.format("delta").load(str(path)).toPandas()


def by_file(emb: pd.DataFrame, rej: pd.DataFrame) -> dict:
    """clip_id of each file (no window suffix) -> None if embedded, else its reject reason."""
    out = {}
    for cid in emb["clip_id"]:
        out[cid.split("#")[0]] = None
    for cid, reason in zip(rej["clip_id"], rej["reason"]):
        assert cid not in out, f"{cid} is both embedded and rejected"
        out[cid] = reason
    return out


def test_corrupted_inputs_every_file_accounted_for(spark, corrupt_set, tmp_path, capsys):
    from audiohash.spark.extract import ExtractParams, extract_embeddings

    manifest, expect = corrupt_set
    summary = extract_embeddings(spark, ExtractParams(str(manifest), str(tmp_path / "emb"), str(tmp_path / "rej"),
                                                      "logmel", {"window_s": 2.0}, windows_per_call=3))
    emb, rej = read(spark, tmp_path / "emb"), read(spark, tmp_path / "rej")
    assert by_file(emb, rej) == expect
    assert rej["stage"].eq("extract").all() and rej["path"].str.startswith("file:/").all()
    assert (summary.files, summary.embedded_files, summary.rejected_files, summary.skipped_files) == (15, 9, 6, 0)
    assert summary.embedded_rows == len(emb) == 6 + 1 + 1 + 300
    assert summary.reasons == {"unreadable": 1, "empty": 1, "unsupported_format": 1, "nan_samples": 1,
                               "all_silent": 1, "missing": 1}
    long = emb[emb["path"].str.endswith("/long.wav")].sort_values("offset_s")
    assert long["clip_id"].tolist() == [f"long#{2 * k}" for k in range(300)]
    assert {len(v) for v in emb["embedding"]} == {128} and emb["clip_id"].is_unique
    assert set(emb["extractor"]) == {"logmel"} and set(emb["sample_rate"]) == {16000}
    assert set(emb["extractor_version"]) == {make_extractor("logmel").version}
    printed = capsys.readouterr().out
    assert "extract [plan] 15 input files: 13 to embed" in printed and "2 rejected unread" in printed
    assert "extract [embed] 13 files -> 9 embedded (308 rows), 4 rejected" in printed

    # Parity: the in-process worker over the same files gives the same rows and vectors.
    inputs = manifest_inputs(pd.read_csv(manifest, dtype=str, keep_default_na=False), str(manifest))
    local = embed_files(inputs, make_extractor("logmel"), windows_per_call=1)
    local_rows = local[local["reject_reason"].isna()].set_index("clip_id")["embedding"]
    spark_rows = emb.set_index("clip_id")["embedding"]
    assert sorted(local_rows.index) == sorted(spark_rows.index)
    np.testing.assert_allclose(np.stack(spark_rows[local_rows.index]), np.stack(local_rows), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bytes_through_binaryfile_give_the_same_tables(spark, corrupt_set, tmp_path):
    """The path every non-local filesystem takes (listing and bytes through Spark), on local files."""
    from audiohash.spark.extract import ExtractParams, extract_embeddings

    manifest, expect = corrupt_set
    local = extract_embeddings(spark, ExtractParams(str(manifest), str(tmp_path / "a"), str(tmp_path / "ar"),
                                                    "logmel"))
    through_spark = extract_embeddings(spark, ExtractParams(str(manifest), str(tmp_path / "b"), str(tmp_path / "br"),
                                                            "logmel", spark_io=True))
    assert (through_spark.embedded_rows, through_spark.reasons) == (local.embedded_rows, local.reasons)
    a, b = read(spark, tmp_path / "a").set_index("clip_id"), read(spark, tmp_path / "b").set_index("clip_id")
    assert sorted(a.index) == sorted(b.index)
    np.testing.assert_array_equal(np.stack(a.loc[b.index, "embedding"]), np.stack(b["embedding"]))
    assert by_file(b.reset_index(), read(spark, tmp_path / "br")) == expect


@pytest.mark.slow
def test_rerun_skips_embedded_files_unread_and_keeps_one_place_per_file(spark, small_manifest, tmp_path):
    from audiohash.spark.extract import ExtractParams, extract_embeddings
    from audiohash.spark.tables import table_version

    d = tmp_path / "audio"
    d.mkdir()
    clips = rendered(small_manifest, 5)
    for i, src in enumerate(clips[:3]):
        shutil.copy(src, d / f"c{i}.wav")
    (d / "broken.wav").write_bytes(b"")
    pd.DataFrame({"path": ["c0.wav", "c1.wav", "c2.wav", "broken.wav"]}).to_csv(d / "m.csv", index=False)
    emb, rej = str(tmp_path / "emb"), str(tmp_path / "rej")

    def run(**kw):
        params = {"window_s": 2.0, **kw}
        return extract_embeddings(spark, ExtractParams(str(d / "m.csv"), emb, rej, "logmel", params))

    first = run()
    assert (first.embedded_files, first.rejected_files, first.mode, first.embeddings_version) == (3, 1, "overwrite", 0)
    before = read(spark, emb).set_index("clip_id")["embedding"]

    # Nothing new: nothing read, nothing committed to the embeddings table.
    again = run()
    assert (again.skipped_files, again.embedded_files, again.mode, again.embeddings_version) == (3, 0, "none", None)
    assert table_version(spark, emb) == 0

    # c0's bytes are now garbage (they must not be read), broken.wav is fixed, c3 is new.
    (d / "c0.wav").write_bytes(b"garbage")
    shutil.copy(clips[3], d / "broken.wav")
    shutil.copy(clips[4], d / "c3.wav")
    pd.DataFrame({"path": ["c0.wav", "c1.wav", "c2.wav", "broken.wav", "c3.wav"]}).to_csv(d / "m.csv", index=False)
    third = run()
    assert (third.skipped_files, third.embedded_files, third.rejected_files, third.mode) == (3, 2, 0, "append")
    assert table_version(spark, emb) == 1
    after = read(spark, emb).set_index("clip_id")
    assert sorted(after.index) == ["broken", "c0", "c1", "c2", "c3"]
    np.testing.assert_array_equal(np.stack(after.loc[before.index, "embedding"]), np.stack(before))
    assert read(spark, rej).empty  # broken.wav's old reject is gone: it is embedded now

    # Another extractor version (1-s windows): the table is replaced, in one commit.
    fourth = run(window_s=1.0)
    assert (fourth.mode, fourth.embedded_files, fourth.rejected_files) == ("overwrite", 4, 1)
    replaced = read(spark, emb)
    assert set(replaced["extractor_version"]) == {make_extractor("logmel", window_s=1.0).version}
    assert len(replaced) == 8 and table_version(spark, emb) == 2  # 4 files x two 1-s windows
    assert read(spark, rej)[["clip_id", "reason"]].values.tolist() == [["c0", "unsupported_format"]]


def test_folder_tree_through_the_job(spark, small_manifest, tmp_path, capsys):
    root = tmp_path / "esc"
    for label, srcs in (("dog", rendered(small_manifest, 2)), ("rain", rendered(small_manifest, 5)[2:5])):
        (root / label).mkdir(parents=True)
        for i, src in enumerate(srcs):
            x, sr = sf.read(src, dtype="float32")
            sf.write(root / label / f"{i}.{'flac' if label == 'rain' else 'WAV'}", x, sr)
    (root / "dog" / "notes.txt").write_text("not an input")
    (root / "rain" / "broken.ogg").write_text("not audio either")
    (root / "README.md").write_text("ignored")
    cfg = make_config(tmp_path / "lake", f"extract.input={root}")
    run_job_main("extract", cfg)
    emb = read(spark, cfg.lake.table("embeddings"))
    assert sorted(zip(emb["clip_id"], emb["label"])) == [
        ("dog/0", "dog"), ("dog/1", "dog"), ("rain/0", "rain"), ("rain/1", "rain"), ("rain/2", "rain")]
    rej = read(spark, cfg.lake.table("rejects"))
    assert rej[["clip_id", "reason"]].values.tolist() == [["rain/broken", "unsupported_format"]]
    assert "extract: 6 files -> 5 embedded (5 rows), 1 rejected (unsupported_format 1)" in capsys.readouterr().out


class TinyConv(torch.nn.Module):
    """A small conv net over the waveform: (b, samples) -> (b, 16)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 8, kernel_size=400, stride=160)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x.unsqueeze(1))).mean(dim=2))


def test_torchscript_model_round_trips_through_the_job(spark, small_manifest, tmp_path):
    torch.manual_seed(0)
    eager = TinyConv().eval()
    model_path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(eager), str(model_path))
    clips = rendered(small_manifest, 4)
    pd.DataFrame({"path": clips, "clip_id": [f"t{i}" for i in range(4)]}).to_csv(tmp_path / "m.csv", index=False)
    cfg = make_config(tmp_path / "lake", f"extract.input={tmp_path / 'm.csv'}", "extract.extractor=torchscript",
                      f"extract.model_path={model_path}")
    run_job_main("extract", cfg)
    emb = read(spark, cfg.lake.table("embeddings")).set_index("clip_id").sort_index()
    assert list(emb.index) == ["t0", "t1", "t2", "t3"]
    assert set(emb["extractor"]) == {"torchscript"}
    assert set(emb["extractor_version"]) == {hashlib.sha256(model_path.read_bytes()).hexdigest()[:16]}
    with torch.no_grad():
        expected = eager(torch.from_numpy(np.stack([sf.read(c, dtype="float32")[0] for c in clips]))).numpy()
    np.testing.assert_allclose(np.stack(emb["embedding"]), expected, rtol=1e-4, atol=1e-5)


def test_aisfx_through_the_job_on_gm_and_recorded_clips(spark, small_manifest, tmp_path):
    """The pretrained CNN in the executors: recorded one-shots (drums: AVL's kits, zero-padded to one
    window) and rendered GM clips give the same rows as the in-process worker."""
    from audiohash.dataset import build_dataset
    from audiohash.features import get_extractor

    drums = build_dataset("drums", tmp_path / "drums")
    # One recorded one-shot per drum piece and kit (the short ones padded to 0.5 s among them), one
    # GM clip per class: the CNN costs ~60 ms of CPU per window, twice (job and reference).
    recorded = manifest_inputs(pd.read_csv(drums), str(drums)).groupby(["label", "source"]).head(1)
    rows = pd.concat([recorded, manifest_inputs(pd.read_csv(small_manifest), str(small_manifest)).groupby("label").head(1)],
                     ignore_index=True)
    rows.to_csv(tmp_path / "m.csv", index=False)
    cfg = make_config(tmp_path / "lake", f"extract.input={tmp_path / 'm.csv'}", "extract.extractor=aisfx")
    run_job_main("extract", cfg)
    emb = read(spark, cfg.lake.table("embeddings")).set_index("clip_id").sort_index()
    extractor = get_extractor("aisfx")
    expected = embed_files(rows, extractor).set_index("clip_id").sort_index()
    assert expected["reject_reason"].isna().all()
    assert list(emb.index) == list(expected.index) and len(emb) >= len(rows)
    assert set(emb["extractor"]) == {"aisfx"} and set(emb["extractor_version"]) == {extractor.version}
    assert set(emb["sample_rate"]) == {44100}
    assert (emb.loc[expected.index, "source"] == expected["source"]).all()
    np.testing.assert_allclose(np.stack(emb["embedding"]), np.stack(expected["embedding"]), rtol=1e-5, atol=1e-4)


def test_external_embeddings_through_extract_train_encode_query(spark, tmp_path, capsys):
    """Bring your own embeddings: a Parquet of 2,400 clustered vectors (and five bad rows) through the
    four jobs; the rows land with extractor 'external' and the query job ranks them."""
    import mlflow

    from audiohash.errors import AudiohashError
    from audiohash.tracking import load_registered_bundle, use_store

    rng = np.random.default_rng(0)
    n_classes, per_class, dim = 24, 100, 32
    centers = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = (centers[labels] + 0.35 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    clip_ids = [f"clip{i:05d}" for i in range(len(x))]
    split = np.where(np.arange(len(x)) % per_class < 10, "query", "db")
    emb = [v.tolist() for v in x]
    bad = {"bad-nan": [np.nan] * dim, "bad-dim": [0.5] * (dim - 1), "bad-none": None}
    frame = pd.DataFrame({"clip_id": clip_ids + list(bad) + ["clip00000"],
                          "embedding": emb + list(bad.values()) + [emb[0]],
                          "label": [f"class{k}" for k in labels] + ["x"] * 4,
                          "split": list(split) + ["db"] * 4})
    frame.to_parquet(tmp_path / "clap.parquet", row_group_size=1000)

    with pytest.raises(AudiohashError, match="extract.external_version=NAME"):
        run_job_main("extract", make_config(tmp_path / "lake", f"extract.input={tmp_path / 'clap.parquet'}"))
    cfg = make_config(tmp_path / "lake", f"extract.input={tmp_path / 'clap.parquet'}",
                      "extract.external_version=synthetic-v1", "train.bits=32", "query.results_r=10",
                      "query.float_reference=false")
    run_job_main("extract", cfg)
    printed = capsys.readouterr().out
    assert ("extract: 2404 rows -> 2399 embedded (2399 rows), 5 rejected (dimension 1, duplicate_clip_id 2, "
            "missing_embedding 1, nan_embedding 1)") in printed  # clip00000 twice: both copies out
    emb_table = read(spark, cfg.lake.table("embeddings"))
    assert len(emb_table) == 2399 and emb_table["clip_id"].is_unique and "clip00000" not in set(emb_table["clip_id"])
    assert set(emb_table["extractor"]) == {"external"} and set(emb_table["extractor_version"]) == {"external-synthetic-v1"}
    assert emb_table["sample_rate"].isna().all() and emb_table["path"].isna().all()
    got = emb_table.set_index("clip_id").loc[clip_ids[1:]]
    np.testing.assert_array_equal(np.stack(got["embedding"]), x[1:])
    assert (got["label"] == [f"class{k}" for k in labels[1:]]).all() and (got["split"] == split[1:]).all()
    rejects = read(spark, cfg.lake.table("rejects")).sort_values("path")
    assert dict(zip(rejects["clip_id"], rejects["reason"])) == {
        "bad-nan": "nan_embedding", "bad-dim": "dimension", "bad-none": "missing_embedding",
        "clip00000": "duplicate_clip_id"}
    assert rejects["path"].str.startswith(f"file:{tmp_path}/clap.parquet#row=").all()

    # A rerun skips the rows the table holds; the bad ones are checked again, their rejects replaced, not doubled.
    run_job_main("extract", cfg)
    assert "extract: 2404 rows -> 0 embedded (0 rows), 5 rejected" in capsys.readouterr().out
    assert len(read(spark, cfg.lake.table("rejects"))) == 5

    run_job_main("train", cfg, method=None, bits=None, label_fraction=None)
    run_job_main("encode", cfg)
    run_job_main("query", cfg)
    assert load_registered_bundle(cfg).meta["extractor"] == "external"
    runs = mlflow.search_runs([use_store(cfg)])
    query_run = runs[runs["tags.audiohash.job"] == "query"].iloc[0]
    assert query_run["metrics.map_all"] > 0.5  # 24 well-separated clusters: PQ ranks same-class rows first
    codes = read(spark, cfg.lake.table("codes"))
    assert len(codes) == (split[1:] == "db").sum()
    # Search (no Spark) takes the external vectors: a query row's vector gets the query job's ranking.
    from audiohash.ranking import ranking_mismatch
    from audiohash.search import SearchEngine

    engine = SearchEngine.open(cfg)
    results = read(spark, cfg.lake.table("results")).sort_values(["query_id", "rank"])
    for i in np.flatnonzero(split == "query")[1:4]:
        job = results[results["query_id"] == clip_ids[i]]
        found = engine.search(embedding=x[i], top=10)
        assert ranking_mismatch(np.asarray([[h.distance for h in found.hits]], np.float32),
                                np.asarray([[h.clip_id for h in found.hits]], object),
                                job["distance"].to_numpy()[None], job["clip_id"].to_numpy(object)[None],
                                complete=False) is None
        assert {h.label for h in found.hits[:5]} == {f"class{labels[i]}"}
    with pytest.raises(AudiohashError, match="external embeddings .*search with an embedding vector"):
        engine.search(audio=b"RIFF....", top=3)
