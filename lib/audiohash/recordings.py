"""Benchmark datasets of real recorded audio, built from Debian packages (no synthesis).

Three datasets, each holding out whole recording chains (a kit, a voice, a sampling author) as
the `query` split, so that no query was recorded by a chain seen in the `db` split:

- drums (avldrums.lv2-soundfont): the one-shots inside AVL's two acoustic-kit SoundFonts, read
  straight out of the .sf2 (audiohash.sf2), one WAV per recorded sample; the class is the drum
  piece on the key of the sample's zone (AVL_KEY_CLASSES); the source is the kit.
- kits (hydrogen-drumkits): the samples of the package's acoustic Hydrogen drumkits; the class
  comes from the instrument's name in drumkit.xml (KIT_NAME_RULES); the source is who sampled the
  kit (KIT_SOURCES).
- voices (hedgewars-data): the English voice packs' phrases; the class is the phrase (the file
  name, variant digits dropped: Ow1..Ow4 -> ow); voices sharing a recording are one source.

The query split is whole sources, taken in a seeded order until it holds at least QUERY_FRACTION
(25%) of the recordings, passing over a source that would take it past QUERY_MAX_FRACTION (40%)
(`query_sources`; with two kits, one kit).

Rules common to all (`build`): a recording stored twice in a source under one label is kept once,
under two labels it is dropped (its label is ambiguous); a query clip whose recorded object is in
db too (`Recording.shared`) is dropped, and so is one whose class has no db clip. Recordings shorter
than audio.MIN_DURATION_S (0.5 s, the extract job's minimum) are zero-padded at the end to 0.5 s
and written as WAV (same rate, channels and bit depth); every other file is copied as the package
ships it (OGG, FLAC, AIFF, WAV). A file that audio.decode_audio rejects (digital silence, ...) is
dropped. dataset.json counts every drop by reason.

Layout: out_dir/<source>/<label>/<clip_id>.<ext>, out_dir/manifest.csv (clip_id, path, label,
split, source; sorted by clip_id), out_dir/copyright (the package's, for the licence terms) and
out_dir/dataset.json, written last: a folder without it is never reused. The .deb comes from
`apt-get download PKG=VERSION` into AUDIOHASH_DEB_CACHE (default ~/.cache/audiohash/debs) and
is read with `dpkg-deb --fsys-tarfile`: nothing is installed and no root is needed, except for
one `apt-get update` when apt does not know the pinned version yet.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile

from audiohash.audio import MIN_DURATION_S, AudioRejected, decode_audio
from audiohash.errors import AudiohashError
from audiohash.sf2 import MONO, read_sf2

log = logging.getLogger("audiohash.recordings")

FORMAT_VERSION = 1
DEB_CACHE_ENV = "AUDIOHASH_DEB_CACHE"
MANIFEST_COLUMNS = ["clip_id", "path", "label", "split", "source"]
QUERY_FRACTION, QUERY_MAX_FRACTION = 0.25, 0.4   # share of the recordings held out (query_sources)


@dataclass(frozen=True)
class Recording:
    """One recording as a builder found it in the package."""
    clip_id: str            # unique in the dataset, file-name safe
    label: str
    source: str             # the recording chain: kit, voice(s) or sampling author
    data: bytes             # a complete audio file that libsndfile reads
    suffix: str             # ".wav", ".ogg", ...
    shared: str = ""        # names a recorded object found in several sources ("" = none)
    split: str = "db"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- fetching and reading the package -----------------------------------------------------------

def deb_cache() -> Path:
    return Path(os.environ.get(DEB_CACHE_ENV) or Path.home() / ".cache" / "audiohash" / "debs")


def _apt(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise AudiohashError(f"{args[0]} not found: building this dataset needs Debian's apt and dpkg") from e


def fetch_deb(package: str, version: str) -> Path:
    """The package's .deb at exactly this version, from the cache or `apt-get download`.

    Checks only that dpkg-deb reads it and that it is that package and version. Processes sharing
    the cache (parallel test workers, two builds) download one at a time: apt's own lock would
    fail the second `apt-get update` rather than wait."""
    cache = deb_cache()
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"   # how apt names the file
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(cache.glob(pattern)) or _download(package, version, cache, pattern)
    deb = found[0]
    r = _apt(["dpkg-deb", "--field", str(deb), "Package", "Version"], cache)
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    if r.returncode != 0 or fields != {"Package": package, "Version": version}:
        raise AudiohashError(f"{deb} is not a readable .deb of {package} {version} "
                             f"({r.stderr.strip() or fields}); delete it and build again")
    return deb


def _download(package: str, version: str, cache: Path, pattern: str) -> list[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))   # no half file under the real name
    try:
        cmd = ["apt-get", "download", f"{package}={version}"]
        r = _apt(cmd, tmp)
        if r.returncode != 0 and re.search(r"Unable to locate|Can't find a source|not found", r.stderr):
            log.info("apt does not know %s=%s yet: running apt-get update once", package, version)
            update = ["apt-get", "update"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get", "update"]
            u = _apt(update, tmp)
            if u.returncode != 0:
                raise AudiohashError(f"`{' '.join(update)}` failed (it needs root): {u.stderr.strip()[-300:]}")
            r = _apt(cmd, tmp)
        if r.returncode != 0:
            raise AudiohashError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}; the dataset pins "
                                 f"this version: put its .deb in {cache} ({DEB_CACHE_ENV}) by hand")
        for f in tmp.glob(pattern):
            os.replace(f, cache / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = sorted(cache.glob(pattern))
    if not found:
        raise AudiohashError(f"apt-get download {package}={version} left no {pattern} in {cache}")
    return found


def read_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """{path: bytes} of the package's regular files whose path (like 'usr/share/...') `wanted`
    accepts, streamed from `dpkg-deb --fsys-tarfile` (nothing is unpacked to disk)."""
    out = {}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=err)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for m in tar:
                    name = m.name.removeprefix("./")
                    if m.isfile() and wanted(name):
                        out[name] = tar.extractfile(m).read()
            while proc.stdout.read(1 << 16):   # the archive's padding: dpkg-deb must not die of SIGPIPE
                pass
        except tarfile.TarError as e:
            proc.kill()
            raise AudiohashError(f"{deb}: cannot read its files ({e}); delete it and build again") from e
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            err.seek(0)
            raise AudiohashError(f"dpkg-deb --fsys-tarfile {deb} failed: "
                                 f"{err.read().decode(errors='replace').strip()[-300:]}; delete it and build again")
    return out


# --- drums: avldrums.lv2-soundfont --------------------------------------------------------------

_AVL_DIR = "usr/share/sounds/sf2/"
AVL_KITS = {"black-pearl": "Black_Pearl_4_LV2.sf2", "red-zeppelin": "Red_Zeppelin_4_LV2.sf2"}
# The key of a sample's zone -> drum piece. AVL lays its kits out on the General MIDI percussion
# keys, whose names are: 36 bass drum, 37 side stick, 38 snare, 39 hand clap, 40 snare (AVL: its
# edge), 41/43/45/47 toms (AVL: floor tom, its edge, rack tom, its edge), 42/44/46 closed, pedal,
# open hi-hat (AVL 48: hi-hat swish), 49/57 crash (AVL 50/58: their chokes), 51/59 ride (AVL 59:
# ride shank, 52: ride choke), 53 ride bell, 54 tambourine, 55 splash, 56 cowbell. Past 59 AVL
# has its own: 60 china, 61 maraca (its samples are named '64-Maraca-N', the GM maraca key, but
# the zones play them on 61).
AVL_KEY_CLASSES = {
    36: "kick", 37: "side_stick", 38: "snare", 40: "snare", 39: "hand_clap",
    41: "tom", 43: "tom", 45: "tom", 47: "tom", 42: "hihat", 44: "hihat", 46: "hihat", 48: "hihat",
    49: "crash", 50: "crash", 57: "crash", 58: "crash", 51: "ride", 52: "ride", 53: "ride", 59: "ride",
    54: "tambourine", 55: "splash", 56: "cowbell", 60: "china", 61: "maraca",
}


def _wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def drum_recordings(kits: dict[str, bytes]) -> list[Recording]:
    """{kit name: .sf2 bytes} -> one Recording per recorded sample, labeled by its zone's key.

    The two AVL kits share some instruments (the same hi-hat, splash, china, cowbell, tambourine,
    clap and maraca; partly byte-identical samples): a key whose sample names (less the '-N'
    layer suffix) or PCM agree between kits is marked `shared`, so it stays in db only."""
    pieces = {}   # (kit, key) -> (names, PCM digests)
    recs = []
    for kit, data in kits.items():
        seen = set()
        for z in read_sf2(data, kit):
            if z.sample_index in seen:
                continue
            seen.add(z.sample_index)
            if z.key_lo != z.key_hi or z.key_lo not in AVL_KEY_CLASSES or z.sample_type != MONO:
                raise AudiohashError(f"{kit}: sample {z.sample_name!r} (keys {z.key_lo}-{z.key_hi}, type "
                                     f"{z.sample_type}) is not a mono one-shot on a key of AVL_KEY_CLASSES")
            names, digests = pieces.setdefault((kit, z.key_lo), (set(), set()))
            names.add(re.sub(r"-\d+$", "", z.sample_name))
            digests.add(hashlib.sha256(z.pcm.tobytes()).digest())
            recs.append(Recording(f"{kit}-k{z.key_lo}-v{z.vel_lo:03d}-{z.vel_hi:03d}", AVL_KEY_CLASSES[z.key_lo],
                                  kit, _wav_bytes(z.pcm, z.sample_rate), ".wav", shared=str(z.key_lo)))
    shared_keys = set()
    for (kit, key), (names, digests) in pieces.items():
        for (other, k2), (names2, digests2) in pieces.items():
            if k2 == key and other != kit and (names & names2 or digests & digests2):
                shared_keys.add(str(key))
    return [replace(r, shared=r.shared if r.shared in shared_keys else "") for r in recs]


def _drums(files: dict[str, bytes]) -> tuple[list[Recording], Counter]:
    return drum_recordings({kit: files[_AVL_DIR + f] for kit, f in AVL_KITS.items()}), Counter()


# --- kits: hydrogen-drumkits --------------------------------------------------------------------

_H2_DIR = "usr/share/hydrogen/data/drumkits/"
# Acoustic kits only, by who recorded them: Emillo's three kits are one sampling chain. Left out:
# ElectricEmpireKit, HardElectro1, VariBreaks, Audiophob (electronic or processed), Gimme A Hand
# and circAfrique (hand percussion, no class in common with the kits).
KIT_SOURCES = {
    "BJA_Pacific": "bja-pacific", "ColomboAcousticDrumkit": "colombo", "ForzeeStereo": "forzee",
    "Millo-Drums_v.1": "emillo", "Millo_MultiLayered2": "emillo", "Millo_MultiLayered3": "emillo",
    "The Black Pearl 1.0": "glen-macarthur", "rumpf_kit_z01_h2": "rumpf",
}
# Instrument name (lower case) -> class: the first rule that matches; no match = not used.
# Crash/ride hybrids and a bare 'cymbal' are ambiguous; cowbell goes before 'bell' (a ride bell).
KIT_NAME_RULES = [
    (r"crash.*ride|ride.*crash|cymbal", None), (r"cowbell", "cowbell"), (r"kick|bass ?drum", "kick"),
    (r"stick|rim click", "side_stick"), (r"snare", "snare"), (r"tom", "tom"), (r"hat|\bhh\b", "hihat"),
    (r"splash", "splash"), (r"china", "china"), (r"crash", "crash"), (r"ride|bell", "ride"),
    (r"clap", "hand_clap"), (r"tambourine", "tambourine"),
]


def kit_class(instrument: str) -> str | None:
    """The drum piece a Hydrogen instrument name means (KIT_NAME_RULES), or None."""
    name = instrument.lower()
    return next((label for pattern, label in KIT_NAME_RULES if re.search(pattern, name)), None)


def kit_recordings(kit: str, source: str, files: dict[str, bytes]) -> tuple[list[Recording], Counter]:
    """One kit: {file name in the kit folder: bytes}, drumkit.xml among them -> its recordings.

    Every layer file of a classified instrument is one recording."""
    try:
        root = ET.fromstring(files["drumkit.xml"])
    except (KeyError, ET.ParseError) as e:
        raise AudiohashError(f"drumkit {kit!r}: no readable drumkit.xml ({e})") from e
    recs, dropped = [], Counter()
    for ins in root.iterfind(".//{*}instrument"):
        label = kit_class(ins.findtext("{*}name") or "")
        for f in ins.iterfind(".//{*}filename"):
            name = (f.text or "").strip()
            if label is None:
                dropped["unclassified_instrument"] += 1
            elif name not in files:
                dropped["missing_file"] += 1
            else:
                stem, suffix = os.path.splitext(name)
                recs.append(Recording(f"{_slug(kit)}-{_slug(stem)}", label, source, files[name], suffix.lower()))
    return recs, dropped


def _kits(files: dict[str, bytes]) -> tuple[list[Recording], Counter]:
    by_kit = defaultdict(dict)
    for path, data in files.items():
        kit, _, name = path.removeprefix(_H2_DIR).partition("/")
        by_kit[kit][name] = data
    recs, dropped = [], Counter()
    for kit in sorted(KIT_SOURCES):
        r, d = kit_recordings(kit, KIT_SOURCES[kit], by_kit[kit])
        recs += r
        dropped += d
    return recs, dropped


# --- voices: hedgewars-data ---------------------------------------------------------------------

_HW_DIR = "usr/share/games/hedgewars/Data/Sounds/voices/"


def _english_voice(path: str) -> bool:
    """A voice pack's phrase file; 'Default_pl', 'Russian_pl', ... are translations (locale suffix)."""
    voice, _, name = path.removeprefix(_HW_DIR).partition("/")
    return path.startswith(_HW_DIR) and "_" not in voice and "/" not in name and name.endswith(".ogg")


def phrase_label(file_name: str) -> str:
    """'Ow3.ogg' -> 'ow', 'Uh-oh.ogg' -> 'uh_oh': the phrase, without the variant number."""
    return re.sub(r"\d+$", "", Path(file_name).stem).lower().replace("-", "_")


def voice_recordings(files: dict[str, bytes]) -> tuple[list[Recording], Counter]:
    """{'<Voice>/<Phrase>.ogg': bytes} -> recordings labeled by phrase, sourced by voice group.

    Voices that hold a byte-identical recording are one source, joined transitively (the packs
    copy files from each other: Classic and Default share 16, HillBilly has one of Default's)."""
    parent = {}

    def find(v):
        while parent.setdefault(v, v) != v:
            v = parent[v]
        return v

    by_digest = defaultdict(list)
    for path in sorted(files):
        by_digest[hashlib.sha256(files[path]).digest()].append(path.split("/")[0])
    for voices in by_digest.values():
        for v in voices:
            parent[find(v)] = find(voices[0])
    groups = defaultdict(set)
    for v in list(parent):
        groups[find(v)].add(v)
    source = {v: "+".join(sorted(_slug(x) for x in groups[find(v)])) for v in parent}
    recs = []
    for path in sorted(files):
        voice, name = path.split("/")
        recs.append(Recording(f"{_slug(voice)}-{_slug(Path(name).stem)}", phrase_label(name), source[voice],
                              files[path], ".ogg"))
    return recs, Counter()


def _voices(files: dict[str, bytes]) -> tuple[list[Recording], Counter]:
    return voice_recordings({p.removeprefix(_HW_DIR): d for p, d in files.items()})


# --- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealDataset:
    package: str
    version: str            # pinned: the build is reproducible only against this exact .deb
    licence: str
    description: str        # one line: size, classes, split, licence
    wanted: Callable[[str], bool]   # which package paths ('usr/share/...') to read
    recordings: Callable[[dict[str, bytes]], tuple[list[Recording], Counter]]   # those files -> (recordings, drops)
    label_rule: str
    split_rule: str


REAL_DATASETS: dict[str, RealDataset] = {
    "drums": RealDataset(
        package="avldrums.lv2-soundfont", version="0.5.2-2",
        licence="CC-BY-SA-3.0 (samples: Glen MacArthur, AVL Drumkits)",
        description="186 recorded drum one-shots of 2 acoustic kits (AVL SoundFonts; 118 db / 68 query), "
                    "13 drum-piece classes (6 in query); query = one whole kit less the pieces it shares "
                    "with the other; too few db rows for 8-bit PQ codebooks (256 per subspace): tests, binary "
                    "methods and 4-bit fast-scan; CC-BY-SA-3.0",
        wanted=lambda p: p.startswith(_AVL_DIR) and p.removeprefix(_AVL_DIR) in AVL_KITS.values(),
        recordings=_drums,
        label_rule="key of the sample's zone -> drum piece (recordings.AVL_KEY_CLASSES)",
        split_rule="a seeded one of the 2 kits is query, less its pieces shared with the other kit"),
    "kits": RealDataset(
        package="hydrogen-drumkits", version="2017.09.19~dfsg-1",
        licence="per kit (see copyright): GPL-2 (ForzeeStereo, Millo*, The Black Pearl), GPL-2+ (Colombo), "
                "CC-BY-SA-3.0-us (BJA_Pacific), CC-BY-3.0 (rumpf)",
        description="~440 recorded drum one-shots of 8 acoustic Hydrogen kits by 6 samplers (seed 0: "
                    "325 db / 105 query), 10-12 drum-piece classes; query = whole samplers, 25-40% of "
                    "clips; GPL-2, CC-BY(-SA)-3.0",
        wanted=lambda p: p.startswith(_H2_DIR) and p.removeprefix(_H2_DIR).split("/")[0] in KIT_SOURCES,
        recordings=_kits,
        label_rule="Hydrogen instrument name -> drum piece by keyword (recordings.KIT_NAME_RULES)",
        split_rule="whole sources (who sampled the kit; Emillo's 3 kits are one) in seeded order "
                   "until 25-40% of the clips are query"),
    "voices": RealDataset(
        package="hedgewars-data", version="1.0.2-6", licence="GFDL-1.3 (Hedgewars sounds, Andrey Korotaev)",
        description="567 spoken phrases of 10 English Hedgewars voices in 8 sources (seed 0: 388 db / "
                    "179 query), 55 phrase classes of 3-36 clips; query = whole voices, 25-40% of clips; "
                    "GFDL-1.3",
        wanted=_english_voice, recordings=_voices,
        label_rule="phrase = file name without variant digits (Ow1..Ow4 -> ow); English voice packs only",
        split_rule="whole sources (a voice, or voices sharing a recording) in seeded order "
                   "until 25-40% of the clips are query"),
}


def _copyright_path(package: str) -> str:
    return f"usr/share/doc/{package}/copyright"


# --- building -----------------------------------------------------------------------------------

def _padded(rec: Recording) -> tuple[Recording, bool]:
    """rec, or rec zero-padded at the end to MIN_DURATION_S as WAV (same rate, channels, depth)."""
    try:
        info = soundfile.info(io.BytesIO(rec.data))
    except soundfile.LibsndfileError:
        return rec, False   # decode_audio rejects it next, with the reason
    need = math.ceil(MIN_DURATION_S * info.samplerate)
    if info.frames >= need:
        return rec, False
    deep = info.subtype in ("PCM_24", "PCM_32", "FLOAT", "DOUBLE")
    x, rate = soundfile.read(io.BytesIO(rec.data), dtype="int32" if deep else "int16", always_2d=True)
    x = np.concatenate([x, np.zeros((need - len(x), x.shape[1]), x.dtype)])
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format="WAV", subtype="PCM_24" if deep else "PCM_16")
    return replace(rec, data=buf.getvalue(), suffix=".wav"), True


def _rejection(rec: Recording) -> str | None:
    """Why the extract job would reject the file (audio.AudioRejected.reason), or None."""
    try:
        rate = soundfile.info(io.BytesIO(rec.data)).samplerate   # decode at it: no resampling needed
    except soundfile.LibsndfileError:
        rate = None
    try:
        decode_audio(rec.data, rec.clip_id, **({"target_sr": rate} if rate else {}))
    except AudioRejected as e:
        return e.reason
    return None


def _dedupe(recs: list[Recording], dropped: Counter) -> list[Recording]:
    """Identical files of one source: under one label kept once (the first by clip_id), under
    several dropped. (Across sources the builders mark them: one source, or `shared`.)"""
    by_digest = defaultdict(list)
    for r in sorted(recs, key=lambda r: r.clip_id):
        by_digest[r.source, hashlib.sha256(r.data).digest()].append(r)
    out = []
    for copies in by_digest.values():
        if len({r.label for r in copies}) > 1:
            dropped["ambiguous_label"] += len(copies)
        else:
            out.append(copies[0])
            dropped["duplicate_recording"] += len(copies) - 1
    return out


def query_sources(sources: list[str], seed: int) -> list[str]:
    """The sources (one entry per recording) held out as query, sorted: whole sources in a seeded
    order until they hold >= QUERY_FRACTION of the recordings, passing over any that would take
    the query past QUERY_MAX_FRACTION (except the first: with two kits, one kit is query)."""
    counts = Counter(sources)
    order = sorted(counts)
    if len(order) < 2:
        raise AudiohashError(f"cannot hold out a source: only {order} found")
    held, n = [], 0
    for i in np.random.default_rng(seed).permutation(len(order)):
        if n >= QUERY_FRACTION * len(sources):
            break
        if not held or n + counts[order[i]] <= QUERY_MAX_FRACTION * len(sources):
            held.append(order[i])
            n += counts[order[i]]
    return sorted(held)


def split(recs: list[Recording], seed: int, dropped: Counter) -> tuple[list[Recording], list[str]]:
    """Assign db/query by source -> (recordings, the query sources). Drops a query clip whose
    recorded object (`shared`) is in db too or whose class has no db clip."""
    held = query_sources([r.source for r in recs], seed)
    recs = [replace(r, split="query" if r.source in held else "db") for r in recs]
    db_shared = {r.shared for r in recs if r.split == "db" and r.shared}
    kept = []
    for r in recs:
        if r.split == "query" and r.shared and r.shared in db_shared:
            dropped["query_recorded_in_db"] += 1
        else:
            kept.append(r)
    db_labels = {r.label for r in kept if r.split == "db"}
    out = [r for r in kept if r.split == "db" or r.label in db_labels]
    dropped["query_class_not_in_db"] += len(kept) - len(out)
    db_digests = {hashlib.sha256(r.data).digest() for r in out if r.split == "db"}
    leak = [r.clip_id for r in out if r.split == "query" and hashlib.sha256(r.data).digest() in db_digests]
    if leak:   # a builder that failed to mark a recording found in several sources
        raise AudiohashError(f"query files identical to db files: {leak[:5]}")
    return out, held


def _params(name: str, seed: int) -> dict:
    """What must match for a build to be reused."""
    spec = REAL_DATASETS[name]
    return {"format_version": FORMAT_VERSION, "name": name, "package": spec.package, "version": spec.version,
            "seed": seed, "query_fraction": [QUERY_FRACTION, QUERY_MAX_FRACTION]}


def _complete(out_dir: Path, params: dict) -> bool:
    try:
        meta = json.loads((out_dir / "dataset.json").read_text())
        with open(out_dir / "manifest.csv", newline="") as f:
            paths = [row["path"] for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return False
    return ({k: meta.get(k) for k in params} == params and len(paths) == meta.get("n_clips")
            and all((out_dir / p).is_file() for p in paths))


def build(name: str, out_dir, seed: int = 0) -> Path:
    """Build (or reuse) the real dataset `name` under out_dir; returns the path of manifest.csv.

    Reuses a folder whose dataset.json has the same name, package version, seed and format and
    whose manifest files all exist. The same package and seed give the same manifest byte for byte.
    A rebuild overwrites files in place and leaves those of an older build that the manifest does
    not list."""
    if name not in REAL_DATASETS:
        raise AudiohashError(f"unknown real dataset {name!r}; known: {sorted(REAL_DATASETS)}")
    spec, out_dir, params = REAL_DATASETS[name], Path(out_dir), _params(name, seed)
    if _complete(out_dir, params):
        log.info("reusing %s in %s", name, out_dir)
        return out_dir / "manifest.csv"
    t0 = time.monotonic()
    deb = fetch_deb(spec.package, spec.version)
    copyright_path = _copyright_path(spec.package)
    files = read_members(deb, lambda p: p == copyright_path or spec.wanted(p))
    copyright_text = files.pop(copyright_path, b"")
    recs, dropped = spec.recordings(files)
    dropped.update(dict.fromkeys(AudioRejected.REASONS, 0))   # every rejection reason counted, even at 0
    recs = _dedupe(recs, dropped)
    usable, n_padded = [], 0
    for rec in recs:
        rec, padded = _padded(rec)
        reason = _rejection(rec)
        if reason:
            dropped[reason] += 1
        else:
            usable.append(rec)
            n_padded += padded
    recs, held = split(usable, seed, dropped)
    recs = sorted(recs, key=lambda r: r.clip_id)
    if len({r.clip_id for r in recs}) != len(recs):
        raise AudiohashError(f"{name}: two recordings got the same clip_id")   # a builder bug
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").unlink(missing_ok=True)   # an interrupted build is never reused
    rows = []
    for r in recs:
        path = f"{r.source}/{r.label}/{r.clip_id}{r.suffix}"
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / path).write_bytes(r.data)
        rows.append([r.clip_id, path, r.label, r.split, r.source])
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(rows)
    (out_dir / "copyright").write_bytes(copyright_text)
    classes = sorted({r.label for r in recs})
    meta = {**params, "licence": spec.licence, "description": spec.description,
            "label_rule": spec.label_rule, "split_rule": spec.split_rule,
            "query_source_names": held,
            "n_clips": len(recs), "n_db": sum(r.split == "db" for r in recs),
            "n_query": sum(r.split == "query" for r in recs), "n_classes": len(classes),
            "min_duration_s": MIN_DURATION_S,
            "padding": f"recordings shorter than {MIN_DURATION_S} s are zero-padded at the end to "
                       f"{MIN_DURATION_S} s and written as WAV; the others are the package's files as shipped",
            "n_padded": n_padded, "dropped": dict(sorted(dropped.items())),
            "classes": {c: {s: sum(r.label == c and r.split == s for r in recs) for s in ("db", "query")}
                        for c in classes},
            "sources": {s: sum(r.source == s for r in recs) for s in sorted({r.source for r in recs})}}
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("built %s: %d clips (%d query) in %.1f s", name, len(recs), meta["n_query"], time.monotonic() - t0)
    return out_dir / "manifest.csv"
