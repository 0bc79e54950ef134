"""The rendered benchmark dataset: determinism, exact note timing, SNR, no bleed, plan, manifest, reuse."""
import csv
import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiohash import dataset as D
from audiohash import recordings
from audiohash.errors import AudiohashError

pytestmark = pytest.mark.skipif(
    not all(Path(p).is_file() for p, _ in D.SOUNDFONTS.values()),
    reason="needs the Debian packages fluid-soundfont-gm and timgm6mb-soundfont")

TINY = (("violin", "cowbell"), 3, 1)   # 2 classes x 3 clips x 2 banks, 1 query per class and bank


@pytest.fixture(scope="module")
def renderers():
    r = {bank: D.Renderer(bank) for bank in D.SOUNDFONTS}
    yield r
    for x in r.values():
        x.close()


@pytest.fixture(scope="module")
def full_plan():
    return D.plan_clips("full", seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small dataset, rendered once for the module (in-process: no pool start-up)."""
    return D.render_dataset(tmp_path_factory.mktemp("small"), size="small", seed=0, workers=1)


def _rows(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _first_above(x, frac):
    return int(np.argmax(np.abs(x) > frac * np.abs(x).max()))


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(D.SIZES, "tiny", TINY)
    caplog.set_level(logging.INFO, logger="audiohash.dataset")
    D.render_dataset(tmp_path / "a", size="tiny", seed=3, workers=1)
    D.render_dataset(tmp_path / "b", size="tiny", seed=3, workers=2)   # other process, other order
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(a) == 2 * 2 * 3 + 2 and a == b
    assert any("clips/s" in r.getMessage() for r in caplog.records)
    D.render_dataset(tmp_path / "c", size="tiny", seed=4, workers=1)
    c = _tree_bytes(tmp_path / "c")
    wavs = [k for k in a if k.endswith(".wav")]
    assert all(a[k] != c[k] for k in wavs)   # the seed does change every clip


def test_plan_is_balanced_and_stratified(full_plan):
    for size, n_classes in (("small", 14), ("full", len(D.GM_MELODIC) + len(D.GM_PERCUSSION))):
        specs = D.plan_clips(size, seed=0) if size == "small" else full_plan
        labels, per, n_query = D.SIZES[size]
        assert len({s.label for s in specs}) == n_classes == len(labels)
        assert {s.kind for s in specs} == {"melodic", "percussion"}
        assert len({s.clip_id for s in specs}) == len(specs) == 2 * n_classes * per
        groups = Counter((s.bank, s.label) for s in specs)
        queries = Counter((s.bank, s.label) for s in specs if s.split == "query")
        assert set(groups.values()) == {per} and set(queries.values()) == {n_query}
        assert set(queries) == set(groups)
        assert 0.12 <= n_query / per <= 0.18
    full = full_plan
    n_query = sum(s.split == "query" for s in full)
    assert 9000 <= len(full) - n_query <= 10000 and 1400 <= n_query <= 1800
    assert D.plan_clips("small", seed=0) == D.plan_clips("small", seed=0)
    assert D.plan_clips("small", seed=1) != D.plan_clips("small", seed=0)


def test_planned_notes_are_plausible(full_plan):
    for s in full_plan:
        notes = s.notes
        assert 1 <= len(notes) <= 4
        on0 = notes[0][2]
        assert 0.05 * D.SAMPLE_RATE <= on0 <= 0.6 * D.SAMPLE_RATE
        assert notes[-1][3] <= D.CLIP_SAMPLES - 0.2 * D.SAMPLE_RATE
        for (pitch, vel, on, off), nxt in zip(notes, notes[1:] + ((None, None, D.CLIP_SAMPLES, None),)):
            assert on < off <= nxt[2] and 50 <= vel <= 127
            assert (on - on0) % D.GRID == 0 and (off - on0) % D.GRID == 0
            if s.kind == "melodic":
                assert D._MELODIC[s.label][1] <= pitch <= D._MELODIC[s.label][2]
            else:
                assert pitch == D.GM_PERCUSSION[s.label] == s.program
        assert 25 <= s.snr_db <= 45 and -20 <= s.peak_dbfs <= -3 and s.noise in ("white", "pink")


def test_onset_is_at_the_planned_sample(renderers):
    specs = [s for s in D.plan_clips("small", seed=0) if s.kind == "percussion"][::5]
    for s in specs:
        x = D.render_clip(renderers[s.bank], s, noise=False)
        on = s.notes[0][2]
        # percussive attack: loud within 4 ms after the onset, nothing (< -80 dB) 4 ms before it
        assert on <= _first_above(x, 0.05) <= on + 64, s.clip_id
        assert np.abs(x[:on - 64]).max() < 1e-4 * np.abs(x).max(), s.clip_id
    # Exactness: moving every note by k samples (k off fluidsynth's 64-sample block grid too)
    # moves the audio by exactly k samples.
    s = specs[0]
    base = D.synthesize(renderers[s.bank], s)
    for k in (1, 7, 31, 45):
        moved = dataclasses.replace(s, notes=tuple((p, v, a + k, b + k) for p, v, a, b in s.notes))
        y = D.synthesize(renderers[s.bank], moved)
        assert np.abs(y[:k]).max() == 0.0
        np.testing.assert_allclose(y[k:], base[:-k], atol=1e-6)


def test_later_notes_land_on_their_planned_samples(renderers):
    # Two cowbell hits: the phrase minus the first hit alone must be the second hit alone.
    on1, off1, on2, off2 = 3001, 3001 + 100 * D.GRID, 3001 + 150 * D.GRID, 3001 + 200 * D.GRID
    s = D.ClipSpec("t", "fluidr3", "cowbell", "percussion", 56, "db",
                   ((56, 100, on1, off1), (56, 100, on2, off2)), -6.0, "white", 30.0, 0)
    phrase = D.synthesize(renderers["fluidr3"], s).astype(np.float64)
    first = D.synthesize(renderers["fluidr3"], dataclasses.replace(s, notes=s.notes[:1]))
    second = D.synthesize(renderers["fluidr3"], dataclasses.replace(s, notes=s.notes[1:]))
    np.testing.assert_allclose(phrase - first, second, atol=1e-6)
    assert on2 <= _first_above(second, 0.05) <= on2 + 64
    with pytest.raises(AudiohashError, match="grid"):
        D.synthesize(renderers["fluidr3"], dataclasses.replace(s, notes=((56, 100, on1, off1 + 1),)))


def test_noise_snr_in_the_written_files(small, renderers):
    rows = {r["clip_id"]: r for r in _rows(small)}
    specs = D.plan_clips("small", seed=0)[::23]
    kinds = set()
    for s in specs:
        wav, sr = soundfile.read(small.parent / rows[s.clip_id]["path"], dtype="float64")
        clean = D.render_clip(renderers[s.bank], s, noise=False).astype(np.float64)
        noise = wav - clean
        loud = np.flatnonzero(np.abs(clean) >= 0.01 * np.abs(clean).max())   # where it sounds
        snr = 10 * np.log10(np.mean(clean[loud[0]:loud[-1] + 1] ** 2) / np.mean(noise**2))
        assert abs(snr - s.snr_db) < 0.3 and 25 - 0.3 <= snr <= 45 + 0.3, s.clip_id
        assert abs(20 * np.log10(np.abs(clean).max()) - s.peak_dbfs) < 0.01
        spec = np.abs(np.fft.rfft(noise)) ** 2
        low, high = spec[100:1000].mean(), spec[8000:15000].mean()   # 50-500 Hz vs 4-7.5 kHz
        assert (low / high > 5) == (s.noise == "pink"), s.clip_id
        assert float(rows[s.clip_id]["snr_db"]) == s.snr_db
        kinds.add(s.noise)
    assert kinds == {"white", "pink"}


def test_no_bleed_from_the_previous_clip(renderers):
    target = next(s for s in D.plan_clips("small", seed=0) if s.label == "cowbell" and s.bank == "fluidr3")
    # a long, loud, still-sounding clip right before: church organ chord held to the clip's end
    loud = D.ClipSpec("loud", "fluidr3", "church_organ", "melodic", 19, "db",
                      ((48, 127, 800, D.CLIP_SAMPLES), (60, 127, 800 + D.GRID, D.CLIP_SAMPLES)),
                      -3.0, "white", 30.0, 0)
    r = renderers["fluidr3"]
    assert np.abs(D.synthesize(r, loud)[-1000:]).max() > 0.01   # it does sound at the very end
    after_loud = D.synthesize(r, target)
    fresh = D.Renderer("fluidr3")
    try:
        alone = D.synthesize(fresh, target)
    finally:
        fresh.close()
    assert np.array_equal(after_loud, alone)
    assert np.abs(after_loud[:target.notes[0][2] - 64]).max() < 1e-6   # decimator ringing only


def test_every_class_sounds_in_both_banks(renderers, full_plan):
    """One clip per class and bank of the full plan (render_clip raises on a silent clip)."""
    seen = set()
    for s in full_plan:
        if (s.bank, s.label) not in seen:
            seen.add((s.bank, s.label))
            x = D.render_clip(renderers[s.bank], s, noise=False)
            assert abs(20 * np.log10(np.abs(x).max()) - s.peak_dbfs) < 0.01
    assert len(seen) == 2 * (len(D.GM_MELODIC) + len(D.GM_PERCUSSION))


def test_manifest_and_files(small):
    rows = _rows(small)
    assert list(rows[0]) == D.MANIFEST_COLUMNS
    specs = {s.clip_id: s for s in D.plan_clips("small", seed=0)}
    assert [r["clip_id"] for r in rows] == list(specs)
    for r in rows:
        s, path = specs[r["clip_id"]], small.parent / r["path"]
        assert path.parts[-3:] == (r["soundfont"], r["label"], r["clip_id"] + ".wav")
        info = soundfile.info(path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 32000, "PCM_16")
        assert (r["label"], r["split"], r["soundfont"], r["kind"]) == (s.label, s.split, s.bank, s.kind)
        assert int(r["program"]) == s.program and int(r["onset_sample"]) == s.notes[0][2]
        assert float(r["onset_s"]) == s.notes[0][2] / 16000 and int(r["n_notes"]) == len(s.notes)
    assert {r["split"] for r in rows} == {"db", "query"}
    meta = json.loads((small.parent / "dataset.json").read_text())
    assert meta["n_clips"] == len(rows) == 336 and meta["size"] == "small" and meta["seed"] == 0
    assert meta["banks"] == ["fluidr3", "timgm6mb"] and meta["format_version"] == D.FORMAT_VERSION
    assert [c["label"] for c in meta["classes"]] == list(D.SIZES["small"][0])


def test_reuse_returns_without_rendering(small, tmp_path, monkeypatch):
    files = [small] + [small.parent / r["path"] for r in _rows(small)]
    before = [f.stat().st_mtime_ns for f in files]
    t = time.monotonic()
    assert D.render_dataset(small.parent, size="small", seed=0, workers=1) == small
    assert time.monotonic() - t < 2.0
    assert [f.stat().st_mtime_ns for f in files] == before
    # ...but a missing clip or other parameters do render again
    monkeypatch.setitem(D.SIZES, "tiny", TINY)
    m = D.render_dataset(tmp_path, size="tiny", seed=0, workers=1)
    victim = tmp_path / _rows(m)[4]["path"]
    good = victim.read_bytes()
    victim.unlink()
    D.render_dataset(tmp_path, size="tiny", seed=0, workers=1)
    assert victim.read_bytes() == good
    D.render_dataset(tmp_path, size="tiny", seed=5, workers=1)
    assert victim.read_bytes() != good and json.loads((tmp_path / "dataset.json").read_text())["seed"] == 5


def test_errors_name_the_soundfont_and_package(tmp_path, monkeypatch):
    monkeypatch.setitem(D.SOUNDFONTS, "timgm6mb", ("/nonexistent/TimGM6mb.sf2", "timgm6mb-soundfont"))
    with pytest.raises(AudiohashError, match=r"/nonexistent/TimGM6mb\.sf2.*install timgm6mb-soundfont"):
        D.render_dataset(tmp_path, size="small")
    assert not any(tmp_path.iterdir())   # failed before writing anything
    with pytest.raises(AudiohashError, match="timgm6mb-soundfont"):
        D.Renderer("timgm6mb")
    with pytest.raises(AudiohashError, match="size"):
        D.plan_clips("huge")
    with pytest.raises(AudiohashError, match="banks"):
        D.plan_clips("small", banks=("fluidr3", "nosuchbank"))


def test_cli_help_and_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        D.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--small" in out and "--banks" in out and "--seed" in out
    with pytest.raises(SystemExit) as e:
        D.main(["--out", str(tmp_path), "--small", "--banks", "fluidr3,nosuch"])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err


def test_registry_lists_the_recorded_datasets(capsys):
    D.main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == list(D.DATASETS) and names[:2] == ["gm", "gm-small"]
    real = [n for n in names if n in recordings.REAL_DATASETS]
    assert len(real) >= 2 and len(real) == len(names) - 2
    for line, (name, text) in zip(lines, D.DATASETS.items()):
        assert line.split(None, 1) == [name, text] and "query" in text


def test_build_dataset_names(small, capsys, tmp_path):
    t = time.monotonic()
    assert D.build_dataset("gm-small", small.parent) == small   # the small render, reused
    assert time.monotonic() - t < 2.0
    D.main(["--name", "gm-small", "--out", str(small.parent)])
    assert capsys.readouterr().out.strip() == str(small)
    with pytest.raises(AudiohashError, match=r"unknown dataset 'nope'; known datasets: gm, gm-small, drums"):
        D.build_dataset("nope", tmp_path)
    for argv, message in [(["--name", "nope", "--out", str(tmp_path)], "unknown dataset 'nope'"),
                          (["--name", "drums"], "--out is required"),
                          (["--name", "drums", "--small", "--out", str(tmp_path)], "--small means"),
                          (["--name", "drums", "--banks", "fluidr3", "--out", str(tmp_path)], "gm datasets only")]:
        with pytest.raises(SystemExit) as e:
            D.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
