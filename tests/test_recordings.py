"""The recorded datasets: the SoundFont reader on a hand-built file, the label, source and split
rules on hand-made inputs, and one real build (drums, the smallest package) checked end to end."""
import csv
import hashlib
import io
import json
import shutil
import struct
import time
from collections import Counter

import numpy as np
import pytest
import soundfile

from audiohash import recordings as R
from audiohash.audio import MIN_DURATION_S, decode_audio
from audiohash.errors import AudiohashError
from audiohash.sf2 import read_sf2

# --- a SoundFont built byte by byte (SoundFont 2.04 spec, sections 4-7) --------------------------


def _chunk(cid: bytes, data: bytes) -> bytes:
    return cid + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)


def _rng(lo, hi):
    return lo | hi << 8


def _zone_tables(items):
    """[(name, [zone: [(gen, amount)]])] -> (header records' bag indices, bag bytes, gen bytes)."""
    bags, gens, firsts = [], [], []
    for _, zones in items:
        firsts.append(len(bags))
        for zone in zones:
            bags.append((len(gens), 0))
            gens += zone
    bags.append((len(gens), 0))   # terminal bag
    gens.append((0, 0))           # terminal generator
    return (firsts + [len(bags) - 1], b"".join(struct.pack("<HH", *b) for b in bags),
            b"".join(struct.pack("<HH", *g) for g in gens))


def make_sf2(samples, instruments, presets) -> bytes:
    """samples: [(name, int16 pcm, rate)]; instruments: [(name, zones)]; presets: [(name, program,
    bank, zones)]; a zone is [(generator, amount)], instrument zones end with sampleID (53),
    preset zones with instrument (41); a first zone without them is the global zone."""
    smpl, shdr = b"", b""
    for name, pcm, rate in samples:
        start = len(smpl) // 2
        smpl += pcm.astype("<i2").tobytes() + b"\0" * 92   # 46 zero samples after each, as the spec asks
        shdr += struct.pack("<20sIIIIIBbHH", name.encode(), start, start + len(pcm), start, start, rate, 60, 0, 0, 1)
    shdr += struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    ifirst, ibag, igen = _zone_tables(instruments)
    inst = b"".join(struct.pack("<20sH", n.encode(), f) for (n, _), f in zip(instruments + [("EOI", [])], ifirst))
    pfirst, pbag, pgen = _zone_tables([(n, z) for n, _, _, z in presets])
    phdr = b"".join(struct.pack("<20sHHHIII", n.encode(), prog, bank, f, 0, 0, 0)
                    for (n, prog, bank, _), f in zip(presets + [("EOP", 0, 0, [])], pfirst))
    pdta = b"pdta" + b"".join(_chunk(c, d) for c, d in [
        (b"phdr", phdr), (b"pbag", pbag), (b"pmod", b"\0" * 10), (b"pgen", pgen), (b"inst", inst),
        (b"ibag", ibag), (b"imod", b"\0" * 10), (b"igen", igen), (b"shdr", shdr)])
    body = b"sfbk" + _chunk(b"LIST", b"INFO" + _chunk(b"ifil", struct.pack("<HH", 2, 1))) \
        + _chunk(b"LIST", b"sdta" + _chunk(b"smpl", smpl)) + _chunk(b"LIST", pdta)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _pcm(seed, n=300):
    return np.random.default_rng(seed).integers(-20000, 20000, n).astype(np.int16)


def _kit(kick: str, hat: str, seed: int) -> bytes:
    """A two-piece kit: a kick on key 36 in two velocity layers, a hi-hat on 42 in one."""
    samples = [(f"36-{kick}-1", _pcm(seed), 44100), (f"36-{kick}-2", _pcm(seed + 1), 44100),
               (hat, _pcm(seed + 2, 40), 22050)]
    instruments = [
        ("kick", [[(43, _rng(30, 40)), (44, _rng(0, 10))],       # global zone: defaults
                  [(44, _rng(1, 63)), (53, 0)], [(44, _rng(64, 127)), (53, 1)]]),
        ("hat", [[(43, _rng(40, 44)), (53, 2)]]),
    ]
    presets = [("kit", 0, 128, [[(44, _rng(0, 127))],             # global preset zone
                                [(43, _rng(36, 36)), (44, _rng(0, 100)), (41, 0)],
                                [(43, _rng(42, 42)), (41, 1)]])]
    return make_sf2(samples, instruments, presets)


def test_read_sf2_maps_samples_to_keys_and_velocities():
    zones = read_sf2(_kit("Kick", "42-Hat", 0))
    got = [(z.preset, z.bank, z.instrument, z.sample_name, z.sample_rate, z.key_lo, z.key_hi, z.vel_lo, z.vel_hi)
           for z in zones]
    # a zone's own generator replaces the global zone's; preset and instrument ranges intersect
    assert got == [("kit", 128, "kick", "36-Kick-1", 44100, 36, 36, 1, 63),
                   ("kit", 128, "kick", "36-Kick-2", 44100, 36, 36, 64, 100),
                   ("kit", 128, "hat", "42-Hat", 22050, 42, 42, 0, 127)]
    for z, seed, n in zip(zones, (0, 1, 2), (300, 300, 40)):
        assert z.pcm.dtype == np.int16 and np.array_equal(z.pcm, _pcm(seed, n))


def test_read_sf2_errors():
    with pytest.raises(AudiohashError, match="kit.sf2: not a SoundFont"):
        read_sf2(b"RIFF\0\0\0\0WAVEfmt ", "kit.sf2")
    good = _kit("Kick", "Hat", 0)
    i = good.index(b"shdr") + 8 + 20   # the first sample's start, pushed past the data
    bad = good[:i] + struct.pack("<I", 10**7) + good[i + 4:]
    with pytest.raises(AudiohashError, match="36-Kick-1.*outside"):
        read_sf2(bad, "kit.sf2")
    no_smpl = good.replace(b"smpl", b"smpX")
    with pytest.raises(AudiohashError, match="smpl"):
        read_sf2(no_smpl)


def test_drum_recordings_mark_the_pieces_both_kits_share():
    # same hi-hat by name (less the '-N' layer suffix), different kicks: only key 42 is shared
    recs = R.drum_recordings({"a": _kit("KickA", "42-Hat", 0), "b": _kit("KickB", "42-Hat-1", 10)})
    assert [(r.clip_id, r.label, r.source, r.shared) for r in recs] == [
        ("a-k36-v001-063", "kick", "a", ""), ("a-k36-v064-100", "kick", "a", ""), ("a-k42-v000-127", "hihat", "a", "42"),
        ("b-k36-v001-063", "kick", "b", ""), ("b-k36-v064-100", "kick", "b", ""), ("b-k42-v000-127", "hihat", "b", "42")]
    x, rate = soundfile.read(io.BytesIO(recs[2].data), dtype="int16")
    assert rate == 22050 and np.array_equal(x, _pcm(2, 40))
    # identical PCM under different names is shared too
    both = R.drum_recordings({"a": _kit("KickA", "42-HatA", 0), "b": _kit("KickB", "42-HatB", 0)})
    assert {r.shared for r in both} == {"36", "42"}


# --- label, source and split rules ---------------------------------------------------------------


def test_kit_names_to_classes():
    cases = {"Kick (Tama Superstar 22\")": "kick", "c3 - bass drum 1": "kick", "BassDrum": "kick",
             "Pearl Side Stick": "side_stick", "Rim Click (Pearl Free Floating Maple 14x3.5)": "side_stick",
             "Snare Rimshot": "snare", "Snare Jazz": "snare", "tomhi2": "tom", "Floor Tom": "tom",
             "Closed HH": "hihat", "Hi Hat Opened": "hihat", "Sabian Hat Choke": "hihat",
             "Cowbell": "cowbell", "Paiste Bell": "ride", "ride-cup": "ride", "Ride Jazz": "ride",
             "crash16inch": "crash", "Sabian Crash Flink": "crash", "China (Paiste Alpha 18\")": "china",
             "Zildjian Splash Choke": "splash", "Hand Clap": "hand_clap", "Tambourine Pedal (Pearl PTM-10GH)": "tambourine",
             "Crash/Ride Bell (Paiste Rude Crash/Ride 18\")": None, "ride-crash20inch": None, "d#4 - cymbal 1": None,
             "Agogo Low (Pearl ECB-23)": None, "redo super opaco": None, "17": None}
    assert {name: R.kit_class(name) for name in cases} == cases


def test_kit_recordings_from_drumkit_xml():
    xml = b"""<?xml version="1.0"?><drumkit_info xmlns="http://www.hydrogen-music.org/drumkit">
      <instrumentList>
        <instrument><name>Kick</name><layer><filename>k1.flac</filename></layer>
                                     <layer><filename>k2.flac</filename></layer></instrument>
        <instrument><name>Agogo</name><filename>a.flac</filename></instrument>
        <instrument><name>Snare</name><filename>gone.wav</filename></instrument>
      </instrumentList></drumkit_info>"""
    recs, dropped = R.kit_recordings("My Kit", "me", {"drumkit.xml": xml, "k1.flac": b"1", "k2.flac": b"2", "a.flac": b"3"})
    assert [(r.clip_id, r.label, r.source, r.data, r.suffix) for r in recs] == [
        ("my-kit-k1", "kick", "me", b"1", ".flac"), ("my-kit-k2", "kick", "me", b"2", ".flac")]
    assert dropped == Counter(unclassified_instrument=1, missing_file=1)


def test_voice_rules():
    assert [R.phrase_label(n) for n in ("Ow3.ogg", "Uh-oh.ogg", "Firepunch1.ogg", "Hello.ogg")] == \
        ["ow", "uh_oh", "firepunch", "hello"]
    base = R._HW_DIR
    assert R._english_voice(base + "Pirate/Hello.ogg") and not R._english_voice(base + "Default_pl/Hello.ogg")
    assert not R._english_voice("usr/share/games/hedgewars/Data/Sounds/Hello.ogg")
    files = {"Amy/Ow1.ogg": b"a1", "Amy/Ow2.ogg": b"a2", "Bob/Ow1.ogg": b"a1",   # Bob copied Amy's Ow1
             "Bob/Hello.ogg": b"b1", "Cat/Hello.ogg": b"c1", "Cat/Melon.ogg": b"cx", "Cat/Fire.ogg": b"cx",
             "Dan/Hello.ogg": b"d1", "Eve/Ow1.ogg": b"e1", "Eve/Hello.ogg": b"d1x"}
    recs, _ = R.voice_recordings(files)
    assert {r.clip_id: r.source for r in recs}["bob-hello"] == "amy+bob"
    assert {r.source for r in recs} == {"amy+bob", "cat", "dan", "eve"}
    dropped = Counter()
    kept = R._dedupe(recs, dropped)
    assert dropped == Counter(duplicate_recording=1, ambiguous_label=2)   # Bob/Ow1; Cat's Melon = Fire
    assert sorted(r.clip_id for r in kept) == ["amy-ow1", "amy-ow2", "bob-hello", "cat-hello", "dan-hello",
                                               "eve-hello", "eve-ow1"]


def test_query_sources_hold_out_whole_sources_in_bounds():
    for n_sources in (2, 3, 5, 8, 13):
        for seed in range(40):
            sizes = np.random.default_rng([n_sources, seed]).integers(1, 60, n_sources)
            sources = [f"s{i}" for i, k in enumerate(sizes) for _ in range(k)]
            held = R.query_sources(sources, seed)
            assert held == R.query_sources(sources, seed) and held == sorted(set(held))
            assert 0 < len(held) < n_sources
            frac = sum(s in held for s in sources) / len(sources)
            if len(held) > 1:   # a lone first source may be bigger than the cap (two kits)
                assert frac <= R.QUERY_MAX_FRACTION
    picks = {tuple(R.query_sources([f"s{i}" for i in range(10)], seed)) for seed in range(20)}
    assert len(picks) > 5 and all(len(p) == 3 for p in picks)   # 3 of 10 equal sources = 30%
    with pytest.raises(AudiohashError, match="only"):
        R.query_sources(["a", "a"], 0)


def _rec(clip_id, label, source, data, shared=""):
    return R.Recording(clip_id, label, source, data, ".wav", shared)


def test_split_drops_query_clips_that_db_already_holds():
    recs = [_rec("a1", "kick", "a", b"1", "36"), _rec("a2", "hat", "a", b"2", "42"), _rec("a3", "clap", "a", b"3"),
            _rec("b1", "kick", "b", b"4", "36x"), _rec("b2", "hat", "b", b"5", "42")]
    seed = next(s for s in range(50) if R.query_sources([r.source for r in recs], s) == ["b"])
    dropped = Counter()
    out, held = R.split(recs, seed, dropped)
    assert held == ["b"] and [(r.clip_id, r.split) for r in out] == [
        ("a1", "db"), ("a2", "db"), ("a3", "db"), ("b1", "query")]
    assert dropped == Counter(query_recorded_in_db=1, query_class_not_in_db=0)
    out, _ = R.split(recs + [_rec("b3", "snare", "b", b"6")], seed, dropped)
    assert dropped["query_class_not_in_db"] == 1 and "b3" not in {r.clip_id for r in out}
    with pytest.raises(AudiohashError, match="identical to db"):
        R.split(recs + [_rec("b4", "clap", "b", b"3")], seed, Counter())


def _file(x, rate, fmt, subtype):
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_short_recordings_padded_silent_ones_rejected():
    tone = (0.5 * np.sin(np.arange(4800) / 5)).astype(np.float32)   # 0.1 s at 48 kHz
    short = _rec("s", "kick", "a", _file(np.stack([tone, 0.5 * tone], 1), 48000, "FLAC", "PCM_24"))
    padded, was = R._padded(short)
    x, rate = soundfile.read(io.BytesIO(padded.data), dtype="int32")
    info = soundfile.info(io.BytesIO(padded.data))
    assert was and padded.suffix == ".wav" and (rate, info.channels, info.subtype) == (48000, 2, "PCM_24")
    assert len(x) == 24000 and not x[4800:].any()                              # 0.5 s, zeros after the tone
    orig, _ = soundfile.read(io.BytesIO(short.data), dtype="int32")
    assert np.array_equal(x[:4800], orig)                                      # the recording unchanged
    assert R._rejection(padded) is None
    long = _rec("l", "kick", "a", _file(np.tile(tone, 6), 48000, "WAV", "PCM_16"))
    assert R._padded(long) == (long, False)
    silent = _rec("z", "kick", "a", _file(np.zeros(800, np.int16), 16000, "WAV", "PCM_16"))
    assert R._rejection(R._padded(silent)[0]) == "all_silent"
    assert R._rejection(_rec("t", "kick", "a", b"not audio")) == "unsupported_format"


def test_a_bad_cached_deb_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(R.DEB_CACHE_ENV, str(tmp_path))
    (tmp_path / "avldrums.lv2-soundfont_0.5.2-2_all.deb").write_bytes(b"not a deb")
    with pytest.raises(AudiohashError, match=r"avldrums.lv2-soundfont_0.5.2-2_all.deb is not a readable .deb.*delete it"):
        R.fetch_deb("avldrums.lv2-soundfont", "0.5.2-2")


# --- one real build ------------------------------------------------------------------------------

needs_dpkg = pytest.mark.skipif(not (shutil.which("dpkg-deb") and shutil.which("apt-get")),
                                reason="needs Debian's apt-get and dpkg-deb")


@pytest.fixture(scope="module")
def drums(tmp_path_factory):
    t = time.monotonic()
    manifest = R.build("drums", tmp_path_factory.mktemp("drums"))
    return manifest, time.monotonic() - t


def _rows(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


@needs_dpkg
def test_drums_manifest_files_and_split(drums):
    manifest, _ = drums
    root, rows = manifest.parent, _rows(manifest)
    meta = json.loads((root / "dataset.json").read_text())
    assert list(rows[0]) == R.MANIFEST_COLUMNS and [r["clip_id"] for r in rows] == sorted(r["clip_id"] for r in rows)
    assert (meta["package"], meta["version"], meta["n_clips"]) == ("avldrums.lv2-soundfont", "0.5.2-2", len(rows))
    db = [r for r in rows if r["split"] == "db"]
    query = [r for r in rows if r["split"] == "query"]
    assert len(db) == meta["n_db"] and len(query) == meta["n_query"] > 0 and len(db) + len(query) == len(rows)
    assert {r["source"] for r in query} == set(meta["query_source_names"]) and len(meta["query_source_names"]) == 1
    assert not {r["source"] for r in query} & {r["source"] for r in db}   # a whole kit held out
    assert {r["label"] for r in query} <= {r["label"] for r in db}
    assert {r["label"] for r in rows} == set(R.AVL_KEY_CLASSES.values()) and meta["n_classes"] == 13
    digests = {}
    for r in rows:
        data = (root / r["path"]).read_bytes()
        x = decode_audio(data, r["path"])   # what the extract job does; raises on a rejected file
        assert x.size >= MIN_DURATION_S * 16000 - 1
        digests.setdefault(r["split"], set()).add(hashlib.sha256(data).digest())
        assert r["path"] == f"{r['source']}/{r['label']}/{r['clip_id']}.wav"
    assert not digests["db"] & digests["query"]
    assert meta["n_padded"] > 0 and meta["dropped"]["query_recorded_in_db"] > 0
    assert b"CC-BY-SA-3.0" in (root / "copyright").read_bytes()


@needs_dpkg
def test_drums_reused_and_deterministic(drums, tmp_path):
    manifest, first_build_s = drums
    files = sorted(p for p in manifest.parent.rglob("*") if p.is_file())
    before = [p.stat().st_mtime_ns for p in files]
    t = time.monotonic()
    assert R.build("drums", manifest.parent) == manifest
    assert time.monotonic() - t < min(1.0, first_build_s)
    assert [p.stat().st_mtime_ns for p in files] == before
    again = R.build("drums", tmp_path / "again")
    assert again.read_bytes() == manifest.read_bytes()
    assert {p.relative_to(manifest.parent): p.read_bytes() for p in files} == \
        {p.relative_to(again.parent): p.read_bytes() for p in sorted(again.parent.rglob("*")) if p.is_file()}
    # a half-built folder (no dataset.json) or another seed is built again
    (again.parent / "dataset.json").unlink()
    R.build("drums", again.parent, seed=3)
    meta = json.loads((again.parent / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["query_source_names"] == ["red-zeppelin"]


def test_unknown_real_dataset():
    with pytest.raises(AudiohashError, match="unknown real dataset 'nope'.*drums"):
        R.build("nope", "/nonexistent")
