"""The search service without Spark: a lake made of real parts (the small rendered GM set embedded
by the extract worker, a PQ model registered in a real MLflow store, codes written by the in-process
encode into a real Delta table), searched through ``audiohash.search`` and over HTTP."""
from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.request

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import REPO, make_config
from webdriver import start_chromedriver

from audiohash.errors import AudiohashError

N_SHARDS = 2


def embeddings_rows(manifest) -> pa.Table:
    """The small set's files embedded as the extract job embeds them (``extraction.embed_files``)."""
    from audiohash.extraction import embed_files, manifest_inputs
    from audiohash.features import get_extractor
    from audiohash.schemas import EMBEDDINGS_DDL, arrow_schema

    extractor = get_extractor("timbre")
    files = manifest_inputs(pd.read_csv(manifest), str(manifest))
    rows = embed_files(files, extractor)
    assert rows["reject_reason"].isna().all()
    rows = rows.drop(columns=["n_windows", "reject_reason", "reject_message"])
    rows["embedding"] = [np.asarray(v, np.float32) for v in rows["embedding"]]
    rows["extractor"], rows["extractor_version"] = "timbre", extractor.version
    rows["sample_rate"] = extractor.sample_rate
    rows["extracted_at"] = pd.Timestamp(dt.datetime.now(dt.timezone.utc))
    return pa.Table.from_pandas(rows, schema=arrow_schema(EMBEDDINGS_DDL), preserve_index=False)


def register(cfg, bundle) -> None:
    from audiohash.tracking import job_run, log_and_register_bundle

    with job_run(cfg, "train"):
        log_and_register_bundle(bundle)


@pytest.fixture(scope="module")
def lake(small_manifest, tmp_path_factory):
    """(config, embeddings rows, bundle): model pq 32 bits on the db clips, their codes encoded."""
    from deltalake import write_deltalake

    from audiohash import in_process
    from audiohash.training import train_bundle

    cfg = make_config(tmp_path_factory.mktemp("lake"), "train.bits=32")
    rows = embeddings_rows(small_manifest)
    write_deltalake(cfg.lake.table("embeddings"), rows)
    db = rows.filter(pa.compute.equal(rows.column("split"), "db"))
    x = np.stack(db.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    labels = np.asarray(db.column("label").to_pylist(), object)
    meta = {"embedding_dim": x.shape[1], "extractor": "timbre", "extractor_version": rows.column("extractor_version")[0].as_py()}
    bundle, _ = train_bundle("pq", 32, x, labels, 0.1, 0, {}, cfg.model_name, meta)
    register(cfg, bundle)
    in_process.encode_into(cfg.lake.table("embeddings"), cfg.lake.table("codes"), bundle, N_SHARDS, ("db",))
    return cfg, rows, bundle


@pytest.fixture(scope="module")
def engine(lake):
    from audiohash.search import SearchEngine

    return SearchEngine.open(lake[0])


def query_clips(rows: pa.Table, n: int) -> list[dict]:
    q = rows.filter(pa.compute.equal(rows.column("split"), "query")).to_pylist()
    return q[:n]


def local(path: str) -> str:
    return path[len("file:"):] if path.startswith("file:") else path


def test_search_ranks_as_the_in_process_query_ranks_every_code(lake, engine):
    from audiohash import in_process

    cfg, rows, bundle = lake
    queries = query_clips(rows, 6)
    x = np.stack([q["embedding"] for q in queries]).astype(np.float32)
    D_ref, ids_ref, version = in_process.search_table(cfg.lake.table("codes"), bundle, x, 15)
    for i, q in enumerate(queries):
        by_vector = engine.search(embedding=q["embedding"], top=15)
        by_id = engine.search(clip_id=q["clip_id"], top=15)
        assert by_vector.codes_version == version and by_vector.scanned == 280
        for result in (by_vector, by_id):
            assert [h.clip_id for h in result.hits] == list(ids_ref[i])
            np.testing.assert_allclose([h.distance for h in result.hits], D_ref[i], rtol=1e-5)
        hit = by_vector.hits[0]
        assert hit.source in {"fluidr3", "timgm6mb"} and hit.path.endswith(".wav") and hit.label is not None


@pytest.mark.parametrize("method, nprobe", [("itq", 0), ("pq_fastscan", 0), ("pq", 3)])
def test_binary_fast_scan_and_listed_codes_rank_as_the_in_process_query(lake, tmp_path, method, nprobe):
    """The index over the codes as they are: Hamming for binary codes, 4-bit fast-scan, and the query
    job's inverted file for a model with lists (nprobe > 0); each ranks as the in-process query."""
    from audiohash import in_process
    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.search import load_snapshot

    cfg, rows, _ = lake
    db = rows.filter(pa.compute.equal(rows.column("split"), "db"))
    x = np.stack(db.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    quantizer = make_quantizer(method, 16 if method == "itq" else 32, seed=0).fit(x)
    if nprobe:
        quantizer.fit_lists(x, 7)
    bundle = ModelBundle(quantizer, f"search-{method}", 1, {})
    codes_table = str(tmp_path / "codes")
    in_process.encode_into(cfg.lake.table("embeddings"), codes_table, bundle, N_SHARDS, ("db",))
    snapshot = load_snapshot(bundle, codes_table, nprobe)
    queries = query_clips(rows, 5)
    xq = np.stack([q["embedding"] for q in queries]).astype(np.float32)
    D_ref, ids_ref, _ = in_process.search_table(codes_table, bundle, xq, 12, nprobe=nprobe)
    for i in range(len(queries)):
        D, found, _ = snapshot.scan(quantizer.query_side(xq[i:i + 1]), 12)
        assert [h.clip_id for h in snapshot.hits(D, found)] == list(ids_ref[i][:len(found)])
        np.testing.assert_allclose(D, D_ref[i][:len(found)], rtol=1e-5)


def test_audio_query_is_embedded_as_the_extract_job_embeds_it(lake, engine):
    cfg, rows, _ = lake
    q = query_clips(rows, 1)[0]
    data = open(local(q["path"]), "rb").read()
    np.testing.assert_allclose(engine.embed_audio(data)[0], q["embedding"], rtol=1e-4, atol=1e-5)
    by_audio, by_vector = engine.search(audio=data, top=10), engine.search(embedding=q["embedding"], top=10)
    assert [h.clip_id for h in by_audio.hits] == [h.clip_id for h in by_vector.hits]
    assert set(by_audio.timing_ms) == {"extract", "model", "scan"}


def test_a_filter_ranks_only_the_matching_clips_inside_the_scan(lake, engine):
    from audiohash import in_process

    cfg, rows, bundle = lake
    q = query_clips(rows, 1)[0]
    label = q["label"]
    result = engine.search(embedding=q["embedding"], top=50, where={"label": [label]})
    # Every clip of the class, not those of a fixed top-K that happen to carry it.
    n_class = sum(1 for r in rows.to_pylist() if r["split"] == "db" and r["label"] == label)
    assert result.scanned == n_class and len(result.hits) == min(50, n_class)
    assert {h.label for h in result.hits} == {label}
    D_all, ids_all, _ = in_process.search_table(cfg.lake.table("codes"), bundle, np.asarray([q["embedding"]], np.float32), 280)
    label_of = {r["clip_id"]: r["label"] for r in rows.to_pylist()}
    expected = [c for c in ids_all[0] if label_of[c] == label]  # the class's clips in the full ranking's order
    assert [h.clip_id for h in result.hits] == expected[:len(result.hits)]
    two = engine.search(embedding=q["embedding"], top=5, where={"source": ["timgm6mb"], "label": [label]})
    assert {(h.source, h.label) for h in two.hits} == {("timgm6mb", label)}
    with pytest.raises(AudiohashError, match="cannot filter by 'colour'.*label"):
        engine.search(embedding=q["embedding"], where={"colour": ["red"]})


def test_bad_queries_are_refused_with_what_to_do(lake, engine):
    with pytest.raises(AudiohashError, match="not audio.wav: .*unreadable|audio.wav"):
        engine.search(audio=b"not audio at all", name="not audio.wav")
    with pytest.raises(AudiohashError, match="has 3 dimensions; model .* takes 224"):
        engine.search(embedding=[1.0, 2.0, 3.0])
    with pytest.raises(AudiohashError, match="'nope' has no embedding in .*embeddings"):
        engine.search(clip_id="nope")
    with pytest.raises(AudiohashError, match="exactly one of"):
        engine.search(top=3)


def test_refresh_swaps_in_a_new_version_and_refuses_another_models_codes(lake, tmp_path):
    """A refresh serves the new version at once; codes written by another model are refused and the
    old version keeps serving."""
    import shutil

    from audiohash import in_process
    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.search import SearchEngine, load_snapshot

    cfg, rows, bundle = lake
    copy = make_config(tmp_path, "train.bits=32")
    shutil.copytree(cfg.lake.table("codes"), copy.lake.table("codes"))
    shutil.copytree(cfg.lake.table("embeddings"), copy.lake.table("embeddings"))
    engine = SearchEngine(copy, load_snapshot(bundle, copy.lake.table("codes"), 0))
    assert not engine.refresh()
    first = engine.snapshot.version
    # A newer version by the same model: the db rows minus the first 20 (a user deleting clips).
    db = rows.filter(pa.compute.equal(rows.column("split"), "db"))
    encoded, state = in_process.encode_table(copy.lake.table("embeddings"), bundle, N_SHARDS, ("db",))
    from audiohash.encoding import Lineage

    lineage = Lineage(bundle.model_name, bundle.model_version, N_SHARDS, ("db",), copy.lake.table("embeddings"),
                      state.version, state.table_id)
    in_process.write_code_table(copy.lake.table("codes"), encoded.slice(20), lineage)
    assert engine.refresh() and engine.snapshot.version == first + 1 and len(engine.snapshot) == db.num_rows - 20
    # Another model's codes: refused, the version before keeps serving.
    x = np.stack(db.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    other = ModelBundle(make_quantizer("pq", 32, seed=1).fit(x), bundle.model_name, bundle.model_version + 1, bundle.meta)
    in_process.encode_into(copy.lake.table("embeddings"), copy.lake.table("codes"), other, N_SHARDS, ("db",))
    assert not engine.refresh() and engine.snapshot.version == first + 1


# ---- over HTTP --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engine):
    from audiohash.serve import make_server

    server = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def http(url: str, data: bytes | None = None, content_type: str = "application/octet-stream"):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type")


def test_http_search_by_audio_clip_id_and_embedding(lake, engine, server):
    cfg, rows, _ = lake
    q = query_clips(rows, 1)[0]
    expected = [h.clip_id for h in engine.search(embedding=q["embedding"], top=7).hits]
    status, body, _ = http(server + "/api/search?top=7", open(local(q["path"]), "rb").read(), "audio/wav")
    assert status == 200 and [r["clip_id"] for r in json.loads(body)["results"]] == expected
    status, body, _ = http(server + "/api/search", json.dumps({"clip_id": q["clip_id"], "top": 7}).encode(),
                           "application/json")
    answer = json.loads(body)
    assert [r["clip_id"] for r in answer["results"]] == expected and answer["results"][0]["rank"] == 1
    assert answer["results"][0]["audio"].startswith("/audio/")
    status, body, _ = http(server + f"/api/search?label={q['label']}&top=3",
                           json.dumps({"embedding": [float(v) for v in q["embedding"]]}).encode(), "application/json")
    assert {r["label"] for r in json.loads(body)["results"]} == {q["label"]}
    status, audio, content_type = http(server + answer["results"][0]["audio"])
    assert status == 200 and audio[:4] == b"RIFF" and content_type == "audio/x-wav"


def test_http_errors_are_json_with_the_reason(server):
    status, body, _ = http(server + "/api/search", b"garbage bytes", "audio/wav")
    assert status == 400 and "error" in json.loads(body)
    status, body, _ = http(server + "/api/search", b'{"clip_id": "nope"}', "application/json")
    assert status == 400 and "nope" in json.loads(body)["error"]
    status, body, _ = http(server + "/audio/..%2F..%2Fetc%2Fpasswd")
    assert status == 404  # only files of indexed clips are served
    # One kept-alive connection: a refused request (its body unread by the search) leaves the next intact.
    from http.client import HTTPConnection

    connection = HTTPConnection(server.removeprefix("http://"), timeout=60)
    connection.request("POST", "/api/search?top=many", body=b"x" * 5000, headers={"Content-Type": "audio/wav"})
    response = connection.getresponse()
    assert response.status == 400 and "many" in json.loads(response.read())["error"]
    connection.request("POST", "/api/search?top=2", body=b'{"embedding": ' + json.dumps([0.0] * 224).encode() + b"}",
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and len(json.loads(response.read())["results"]) == 2
    connection.close()
    info = json.loads(http(server + "/api/info")[1])
    assert info["n_codes"] == 280 and info["method"] == "pq" and "label" in info["filters"]


def test_cli_prints_the_top_clips(lake, capsys, monkeypatch, tmp_path):
    from audiohash.search import main

    # run_job names its log file in the environment (for a JVM it would start): keep that to this test.
    monkeypatch.setenv("AUDIOHASH_LOG_FILE", str(tmp_path / "search.log"))

    cfg, rows, _ = lake
    q = query_clips(rows, 1)[0]
    main([local(q["path"]), "--top", "4", "--json", "--conf-file", str(REPO / "conf" / "small.yaml"),
          f"lake.root={cfg.lake.root}", "train.bits=32"])
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["results"]) == 4 and answer["results"][0]["rank"] == 1


# ---- the listening page in a real browser -----------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    import shutil

    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        pytest.skip("no chromium + chromedriver here (Debian: apt-get install chromium chromium-driver; "
                    "make test installs them)")
    with start_chromedriver(tmp_path_factory.mktemp("chromedriver") / "chromedriver.log") as web:
        yield web


RESULT_IDS = "return [...document.querySelectorAll('#results li.result')].map(li => li.dataset.clipId)"


def test_listening_page_uploads_a_clip_plays_results_and_searches_from_one(lake, engine, server, browser, tmp_path):
    cfg, rows, _ = lake
    q = query_clips(rows, 2)[1]
    browser.get(server + "/")
    browser.find("#label option[value]:nth-child(2)")  # the filters came from /api/info
    browser.call("POST", browser.s(f"/element/{browser.find('#file')}/value"), {"text": local(q["path"])})
    browser.find("#results li.result:nth-child(10)")  # waits for the answer
    expected = [h.clip_id for h in engine.search(embedding=q["embedding"], top=10).hits]
    assert browser.script(RESULT_IDS) == expected
    players = browser.script("return [...document.querySelectorAll('#results audio')].map(a => a.src)")
    assert len(players) == 10 and all("/audio/" in src for src in players)
    assert browser.script("return document.getElementById('query-name').textContent") == q["path"].rsplit("/", 1)[1]
    browser.screenshot(tmp_path / "page.png")
    assert (tmp_path / "page.png").stat().st_size > 10_000

    # Click the third result: the page searches from that clip (by clip id).
    third = expected[2]
    browser.script("document.querySelectorAll('#results button.clip')[2].click()")
    browser.find(f"#results li.result[data-clip-id='{third}']:nth-child(1)")
    assert browser.script(RESULT_IDS) == [h.clip_id for h in engine.search(clip_id=third, top=10).hits]

    # Filter by a label, then upload again: every result carries it.
    label = q["label"]
    browser.script(f"const s = document.getElementById('label'); s.value = {json.dumps(label)};"
                   "s.dispatchEvent(new Event('change'))")
    browser.script("document.getElementById('results').textContent = ''")
    browser.call("POST", browser.s(f"/element/{browser.find('#file')}/value"), {"text": local(q["path"])})
    browser.find("#results li.result")
    labels = browser.script("return [...document.querySelectorAll('#results .label')].map(e => e.textContent)")
    assert labels and set(labels) == {label}
