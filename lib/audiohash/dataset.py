"""The real benchmark dataset: labeled 2-s clips rendered from Debian's General MIDI soundfonts.

Each clip is one GM melodic program (channel 1) or one GM percussion key (channel 10, bank 128)
playing a note or a 2-4 note phrase, rendered offline by libfluidsynth (no audio driver is ever
started), decimated to 16 kHz mono, peak-normalised to a random level and mixed with white or pink
noise at a random SNR. Everything random comes from the plan (`plan_clips`), a pure function of
(size, seed, banks), so the same seed gives the same WAV files byte for byte.

Layout written by `render_dataset`: out_dir/<bank>/<label>/<clip_id>.wav (16-bit PCM),
out_dir/manifest.csv and out_dir/dataset.json (written last: its presence marks a finished render).

`DATASETS` names every benchmark dataset, these renders ("gm", "gm-small") and the recorded ones
of audiohash.recordings; `build_dataset(name, out_dir)` builds any of them
(`python -m audiohash.dataset --list`, `--name NAME --out DIR`).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from audiohash import recordings
from audiohash.errors import AudiohashError

log = logging.getLogger("audiohash.dataset")

FORMAT_VERSION = 1
SAMPLE_RATE = 16000        # Hz, output rate
CLIP_SAMPLES = 32000       # 2 s at 16 kHz
# fluidsynth does not band-limit its sample interpolation: rendering straight at 16 kHz folds the
# 8-22 kHz content of cymbals and hi-hats back into the band. Render at 2x and decimate with soxr.
_SYNTH_RATE = 2 * SAMPLE_RATE
# fluidsynth renders in blocks of 64 samples (FLUID_BUFSIZE) and applies a note-on/off only at the
# next block boundary. So every event of a clip sits a whole number of blocks after the first one
# (a 32-sample = 2 ms grid at 16 kHz); the first onset itself is free, reached by a discarded lead-in.
_BLOCK = 64
GRID = _BLOCK * SAMPLE_RATE // _SYNTH_RATE
_PAD = 4 * _BLOCK          # synth samples rendered past the clip end so the decimator sees no edge

# bank name -> (soundfont file, Debian package that installs it). Tests may point these elsewhere.
SOUNDFONTS = {
    "fluidr3": ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "fluid-soundfont-gm"),
    "timgm6mb": ("/usr/share/sounds/sf2/TimGM6mb.sf2", "timgm6mb-soundfont"),
}

# Official GM program names (snake_case) -> (0-based program, lowest, highest MIDI pitch played).
# Timbrally distinct picks over all 16 GM families; ranges keep to where the instrument sounds real.
_MELODIC = {
    "acoustic_grand_piano": (0, 36, 96), "harpsichord": (6, 41, 89), "glockenspiel": (9, 79, 105),
    "vibraphone": (11, 53, 89), "marimba": (12, 45, 96), "tubular_bells": (14, 60, 77),
    "drawbar_organ": (16, 36, 96), "church_organ": (19, 36, 84), "accordion": (21, 53, 89),
    "harmonica": (22, 60, 84), "acoustic_guitar_nylon": (24, 40, 83),
    "overdriven_guitar": (29, 40, 86), "acoustic_bass": (32, 28, 55),
    "electric_bass_finger": (33, 28, 60), "violin": (40, 55, 93), "cello": (42, 36, 76),
    "pizzicato_strings": (45, 36, 84), "orchestral_harp": (46, 36, 96), "timpani": (47, 40, 55),
    "choir_aahs": (52, 48, 79), "trumpet": (56, 54, 82), "trombone": (57, 40, 72),
    "tuba": (58, 28, 58), "french_horn": (60, 41, 77), "alto_sax": (65, 49, 81),
    "oboe": (68, 58, 91), "bassoon": (70, 34, 72), "clarinet": (71, 50, 91), "flute": (73, 60, 96),
    "pan_flute": (75, 60, 96), "lead_1_square": (80, 48, 84), "lead_2_sawtooth": (81, 48, 84),
    "sitar": (104, 48, 77), "banjo": (105, 48, 84), "steel_drums": (114, 52, 76),
    "seashore": (122, 48, 72), "bird_tweet": (123, 60, 84), "telephone_ring": (124, 60, 72),
    "helicopter": (125, 48, 72), "applause": (126, 48, 72), "gunshot": (127, 48, 72),
}
GM_MELODIC: dict[str, int] = {name: v[0] for name, v in _MELODIC.items()}
# GM percussion key names (snake_case) -> MIDI key on channel 10.
GM_PERCUSSION: dict[str, int] = {
    "bass_drum_1": 36, "side_stick": 37, "acoustic_snare": 38, "hand_clap": 39,
    "low_floor_tom": 41, "closed_hi_hat": 42, "open_hi_hat": 46, "crash_cymbal_1": 49,
    "ride_cymbal_1": 51, "tambourine": 54, "cowbell": 56, "vibraslap": 58, "open_hi_conga": 63,
    "maracas": 70, "claves": 75, "open_triangle": 81,
}
_SMALL = ("acoustic_grand_piano", "acoustic_guitar_nylon", "violin", "trumpet", "flute",
          "church_organ", "bird_tweet", "telephone_ring", "bass_drum_1", "acoustic_snare",
          "closed_hi_hat", "crash_cymbal_1", "cowbell", "hand_clap")
# size -> (class labels, clips per class and bank, query clips per class and bank)
SIZES = {"small": (_SMALL, 12, 2), "full": (tuple(GM_MELODIC) + tuple(GM_PERCUSSION), 96, 14)}


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip. Sample indices are at 16 kHz within the clip."""
    clip_id: str
    bank: str
    label: str
    kind: str                 # "melodic" | "percussion"
    program: int              # GM program (melodic) or percussion key
    split: str                # "db" | "query"
    notes: tuple              # ((pitch, velocity, on_sample, off_sample), ...), time-ordered
    peak_dbfs: float          # clean signal peak after normalisation
    noise: str                # "white" | "pink"
    snr_db: float             # clean power while it sounds (see _sounding_power) / noise power
    noise_seed: int

    @property
    def path(self) -> str:
        return f"{self.bank}/{self.label}/{self.clip_id}.wav"


def _kind(label: str) -> str:
    return "melodic" if label in GM_MELODIC else "percussion"


def _grid_span(rng: np.random.Generator, lo_s: float, hi_s: float) -> int:
    """A random length in [lo_s, hi_s] seconds, in samples, a whole number of GRID steps."""
    return int(rng.integers(round(lo_s * SAMPLE_RATE / GRID), round(hi_s * SAMPLE_RATE / GRID) + 1)) * GRID


def _plan_notes(rng: np.random.Generator, label: str) -> tuple:
    """Onset anywhere in 50-600 ms; later events on the 2 ms grid relative to it (see GRID)."""
    t = int(rng.integers(int(0.05 * SAMPLE_RATE), int(0.6 * SAMPLE_RATE) + 1))
    last_off = CLIP_SAMPLES - int(0.2 * SAMPLE_RATE)   # leave room for the release
    if label in GM_PERCUSSION:
        n, lo, hi = int(rng.integers(1, 5)), GM_PERCUSSION[label], GM_PERCUSSION[label]
        dur, gap = ((0.1, 0.8) if n == 1 else (0.1, 0.5)), (0.0, 0.15)
    else:
        n = 1 if rng.random() < 0.4 else int(rng.integers(2, 5))
        _, lo, hi = _MELODIC[label]
        dur, gap = ((0.3, 1.2) if n == 1 else (0.12, 0.45)), (0.0, 0.08)
    pitch, notes = int(rng.integers(lo, hi + 1)), []
    for _ in range(n):
        off = t + _grid_span(rng, *dur)
        if notes and off > last_off:
            break
        notes.append((pitch, int(rng.integers(50, 128)), t, min(off, last_off)))
        pitch = int(np.clip(pitch + rng.integers(-7, 8), lo, hi))   # a melodic random walk
        t = off + _grid_span(rng, *gap)
    return tuple(notes)


def _check(size: str, banks) -> None:
    if size not in SIZES:
        raise AudiohashError(f"unknown dataset size {size!r}; use one of {sorted(SIZES)}")
    bad = [b for b in banks if b not in SOUNDFONTS]
    if bad or not banks or len(set(banks)) != len(banks):
        raise AudiohashError(f"bad soundfont banks {list(banks)!r}; use distinct ones of {list(SOUNDFONTS)}")


def plan_clips(size: str = "full", seed: int = 0, banks=("fluidr3", "timgm6mb")) -> list[ClipSpec]:
    """Deterministic plan: per (bank, class) the same number of clips, a fixed number of them query.

    Each clip draws from its own generator seeded by (seed, bank, class, clip number), so a clip
    does not change when other banks or classes are added."""
    _check(size, banks)
    labels, per, n_query = SIZES[size]
    specs = []
    for bank in banks:
        b = list(SOUNDFONTS).index(bank)
        for label in labels:
            key = [seed, b, 0 if label in GM_MELODIC else 1, GM_MELODIC.get(label, GM_PERCUSSION.get(label))]
            query = set(np.random.default_rng(key + [per]).choice(per, n_query, replace=False).tolist())
            for k in range(per):
                rng = np.random.default_rng(key + [per, k])
                notes = _plan_notes(rng, label)
                specs.append(ClipSpec(
                    clip_id=f"{bank}-{label}-{k:05d}", bank=bank, label=label, kind=_kind(label),
                    program=key[3], split="query" if k in query else "db", notes=notes,
                    peak_dbfs=round(float(rng.uniform(-20.0, -3.0)), 2),
                    noise="pink" if rng.random() < 0.5 else "white",
                    snr_db=round(float(rng.uniform(25.0, 45.0)), 2),
                    noise_seed=int(rng.integers(2**63))))
    return specs


def soundfont_path(bank: str) -> str:
    """The .sf2 file of a bank; AudiohashError naming the file and the Debian package if missing."""
    path, package = SOUNDFONTS[bank]
    if not os.path.isfile(path):
        raise AudiohashError(f"soundfont for bank {bank!r} not found at {path}; "
                             f"install it with: apt-get install {package}")
    return path


@functools.lru_cache(maxsize=1)
def _fluid():
    """pyfluidsynth plus the libfluidsynth calls it does not wrap; imported lazily so that the
    class tables and the planner work without libfluidsynth."""
    try:
        import fluidsynth
    except ImportError as e:
        raise AudiohashError(f"cannot load libfluidsynth ({e}); apt-get install libfluidsynth3") from e
    from ctypes import c_int, c_void_p
    arg = lambda name, t=c_void_p: (name, t, 1)
    return fluidsynth, {
        # float output, not Synth.get_samples(): that one is int16 with a dither whose position
        # runs on across calls, i.e. a clip's bytes would depend on what was rendered before it.
        "write_float": fluidsynth.cfunc("fluid_synth_write_float", c_int, arg("synth"), arg("len", c_int),
                                        arg("lout"), arg("loff", c_int), arg("lincr", c_int),
                                        arg("rout"), arg("roff", c_int), arg("rincr", c_int)),
        "get_sfont": fluidsynth.cfunc("fluid_synth_get_sfont_by_id", c_void_p, arg("synth"),
                                      arg("id", c_int)),
        "add_sfont": fluidsynth.cfunc("fluid_synth_add_sfont", c_int, arg("synth"), arg("sfont")),
        "remove_sfont": fluidsynth.cfunc("fluid_synth_remove_sfont", c_int, arg("synth"), arg("sfont")),
    }


class Renderer:
    """A bank's soundfont, parsed and loaded once (FluidR3: ~0.5 s); `close()` frees it.

    Each clip is rendered by a fresh synth that shares this soundfont. Resetting one long-lived
    synth is not enough with fluidsynth 2.3: a recycled voice keeps ramp state from its previous
    note (the attack of a clip then differs by up to ~1% of full scale with what came before), and
    a system reset issued right after all-sounds-off leaves released voices sounding. A fresh
    synth costs ~1 ms and makes every clip independent of whatever was rendered before it."""

    def __init__(self, bank: str):
        path = soundfont_path(bank)
        fluidsynth, self._c = _fluid()
        self.bank = bank
        self._holder = fluidsynth.Synth(channels=16)   # never rendered with, only owns the soundfont
        sfid = self._holder.sfload(path)
        if sfid < 0:
            raise AudiohashError(f"fluidsynth could not load soundfont {path}")
        self.sfont = self._c["get_sfont"](self._holder.synth, sfid)

    def close(self) -> None:
        self._holder.delete()


class _ClipSynth:
    """A fresh offline synth (no audio driver is ever started) borrowing the renderer's soundfont."""

    def __init__(self, renderer: Renderer):
        fluidsynth, self._c = _fluid()
        self._sfont = renderer.sfont
        self.fs = fluidsynth.Synth(gain=0.2, samplerate=float(_SYNTH_RATE), channels=16,
                                   **{"synth.reverb.active": 0, "synth.chorus.active": 0})
        self.sfid = self._c["add_sfont"](self.fs.synth, self._sfont)
        self.pos = 0   # synth samples rendered so far; events land on block boundaries of this count

    def samples(self, n: int) -> np.ndarray:
        """Render n synth samples -> float32 (n,) mono (mean of L and R)."""
        buf = np.zeros((n, 2), np.float32)
        if n:
            self._c["write_float"](self.fs.synth, n, buf.ctypes.data, 0, 2, buf.ctypes.data, 1, 2)
        self.pos += n
        return buf.mean(axis=1)

    def close(self) -> None:
        for chan in range(16):   # else removing the soundfont warns about every channel's preset
            self.fs.program_unset(chan)
        self._c["remove_sfont"](self.fs.synth, self._sfont)   # so delete() does not free it
        self.fs.delete()


def synthesize(renderer: Renderer, spec: ClipSpec) -> np.ndarray:
    """The clip's notes alone -> float32 (CLIP_SAMPLES,) at SAMPLE_RATE, fluidsynth's own level
    (synth gain 0.2, peaks around 0.01-0.1); every note-on/off lands exactly on its planned sample."""
    events = sorted([(2 * on, 1, p, v) for p, v, on, _ in spec.notes]
                    + [(2 * off, 0, p, 0) for p, _, _, off in spec.notes])   # in synth samples
    if any((t - events[0][0]) % _BLOCK for t, *_ in events):
        raise AudiohashError(f"{spec.clip_id}: note times are off the {GRID}-sample grid")
    lead = (-events[0][0]) % _BLOCK   # discarded, puts the first event (so all) on a block boundary
    synth, chan = _ClipSynth(renderer), (0 if spec.kind == "melodic" else 9)
    try:
        bank, preset = (0, spec.program) if spec.kind == "melodic" else (128, 0)
        if synth.fs.program_select(chan, synth.sfid, bank, preset) != 0:
            raise AudiohashError(f"bank {spec.bank!r} has no preset {bank}:{preset} for {spec.label}")
        synth.samples(lead)
        parts = []
        for when, is_on, pitch, vel in events:
            parts.append(synth.samples(lead + when - synth.pos))
            if is_on:
                synth.fs.noteon(chan, pitch, vel)
            else:
                synth.fs.noteoff(chan, pitch)
        parts.append(synth.samples(lead + 2 * CLIP_SAMPLES + _PAD - synth.pos))
    finally:
        synth.close()
    return soxr.resample(np.concatenate(parts), _SYNTH_RATE, SAMPLE_RATE)[:CLIP_SAMPLES]


def _sounding_power(x: np.ndarray) -> float:
    """Mean power from the first to the last sample within 40 dB of the peak. Not over the whole
    clip: a 50 ms hi-hat would then get its noise ~15 dB lower than a 2 s organ at the same SNR,
    down at the 16-bit quantisation floor."""
    idx = np.flatnonzero(np.abs(x) >= 0.01 * np.abs(x).max())
    return float(np.mean(x[idx[0]:idx[-1] + 1] ** 2))


def render_clip(renderer: Renderer, spec: ClipSpec, noise: bool = True) -> np.ndarray:
    """One finished clip -> float32 (CLIP_SAMPLES,) at SAMPLE_RATE in [-1, 1]: the notes scaled to
    peak at spec.peak_dbfs, plus noise at spec.snr_db relative to their sounding power.

    With noise=False it is the clean, scaled signal; the noisy clip minus it is the noise."""
    x = synthesize(renderer, spec)
    peak = float(np.abs(x).max())
    if peak < 1e-5:
        raise AudiohashError(f"{spec.clip_id}: {spec.label} renders silent in bank {spec.bank!r}")
    x = x.astype(np.float64) * (10 ** (spec.peak_dbfs / 20) / peak)
    if noise:
        rng = np.random.default_rng(spec.noise_seed)
        n = rng.standard_normal(CLIP_SAMPLES)
        if spec.noise == "pink":   # shape white noise to a 1/f power spectrum
            f = np.fft.rfft(n)
            f[1:] /= np.sqrt(np.arange(1, len(f)))
            f[0] = 0.0
            n = np.fft.irfft(f, CLIP_SAMPLES)
        n *= np.sqrt(_sounding_power(x) / np.mean(n**2) / 10 ** (spec.snr_db / 10))
        x = x + n
    return np.clip(x, -1.0, 1.0).astype(np.float32)


_WORKER_RENDERERS: dict[str, Renderer] = {}


def _render_chunk(args) -> int:
    """Pool task: render and write a list of clips; one Renderer per bank per process, reused."""
    out_dir, specs = args
    for spec in specs:
        if spec.bank not in _WORKER_RENDERERS:
            _WORKER_RENDERERS[spec.bank] = Renderer(spec.bank)
        path = Path(out_dir) / spec.path
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, render_clip(_WORKER_RENDERERS[spec.bank], spec), SAMPLE_RATE, subtype="PCM_16")
    return len(specs)


MANIFEST_COLUMNS = ["clip_id", "path", "label", "split", "soundfont", "program", "kind", "n_notes",
                    "pitch", "pitches", "velocity", "onset_sample", "onset_s", "duration_s",
                    "peak_dbfs", "noise", "snr_db"]


def _manifest_row(s: ClipSpec) -> list:
    (p0, v0, on0, _), off = s.notes[0], s.notes[-1][3]
    return [s.clip_id, s.path, s.label, s.split, s.bank, s.program, s.kind, len(s.notes), p0,
            " ".join(str(n[0]) for n in s.notes), v0, on0, on0 / SAMPLE_RATE,
            (off - on0) / SAMPLE_RATE, s.peak_dbfs, s.noise, s.snr_db]


def _params(size: str, seed: int, banks) -> dict:
    """What dataset.json records; a render is reused only if this is identical."""
    _check(size, banks)
    labels, per, n_query = SIZES[size]
    return {"format_version": FORMAT_VERSION, "size": size, "seed": seed, "banks": list(banks),
            "soundfonts": {b: SOUNDFONTS[b][0] for b in banks},
            "sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES,
            "n_clips": len(banks) * len(labels) * per,
            "n_query": len(banks) * len(labels) * n_query,
            "classes": [{"label": lb, "kind": _kind(lb),
                         "program": GM_MELODIC.get(lb, GM_PERCUSSION.get(lb))} for lb in labels]}


def _complete(out_dir: Path, params: dict) -> bool:
    try:
        if json.loads((out_dir / "dataset.json").read_text()) != params:
            return False
        with open(out_dir / "manifest.csv", newline="") as f:
            paths = [row["path"] for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return False
    return len(paths) == params["n_clips"] and all((out_dir / p).is_file() for p in paths)


def render_dataset(out_dir, size: str = "full", seed: int = 0, banks=("fluidr3", "timgm6mb"),
                   workers: int | None = None) -> Path:
    """Render (or reuse) the dataset under out_dir; returns the path of manifest.csv.

    Reuses an existing render when dataset.json holds the same parameters and every manifest file
    exists (bump FORMAT_VERSION when the rendering changes). A re-render overwrites files in place
    and leaves clips of an older plan that the new manifest does not list.
    workers: processes (default min(2, cpus)); the output does not depend on it."""
    out_dir, banks = Path(out_dir), tuple(banks)
    params = _params(size, seed, banks)
    if _complete(out_dir, params):
        log.info("reusing %d clips in %s", params["n_clips"], out_dir)
        return out_dir / "manifest.csv"
    for bank in banks:
        soundfont_path(bank)   # fail before any work
    specs = plan_clips(size, seed, banks)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").unlink(missing_ok=True)   # an interrupted render is never reused
    workers = workers or min(2, os.cpu_count() or 1)
    chunks = [(str(out_dir), specs[i:i + 100]) for i in range(0, len(specs), 100)]
    t0, done, logged = time.monotonic(), 0, 0
    log.info("rendering %d clips (%s, seed %d, banks %s) with %d process(es)",
             len(specs), size, seed, ",".join(banks), workers)
    # spawn, not fork: the caller may hold threads (a JVM for Spark) that fork would not copy safely
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for n in (pool.imap(_render_chunk, chunks) if pool else map(_render_chunk, chunks)):
            done += n
            if done - logged >= 1000 or done == len(specs):
                logged = done
                log.info("rendered %d/%d clips (%.1f clips/s)", done, len(specs),
                         done / (time.monotonic() - t0))
    finally:
        if pool:
            pool.terminate()
        for r in _WORKER_RENDERERS.values():
            r.close()
        _WORKER_RENDERERS.clear()
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(_manifest_row(s) for s in specs)
    (out_dir / "dataset.json").write_text(json.dumps(params, indent=1) + "\n")
    return out_dir / "manifest.csv"


# Every benchmark dataset by name: the GM renders above and the recordings of audiohash.recordings.
DATASETS: dict[str, str] = {
    "gm": "10,944 clips rendered from 2 General MIDI soundfonts (FluidR3, TimGM6mb; 9,348 db / 1,596 "
          "query), 57 classes (41 GM programs + 16 drum keys), query = 14 random clips per class and "
          "soundfont; MIT, GPL-2",
    "gm-small": "336 clips of the GM render (280 db / 56 query), 14 classes, query = 2 random clips per "
                "class and soundfont (tests, demo); MIT, GPL-2",
    **{name: spec.description for name, spec in recordings.REAL_DATASETS.items()},
}


def build_dataset(name: str, out_dir, seed: int = 0) -> Path:
    """Build (or reuse) the dataset `name` of DATASETS under out_dir; returns manifest.csv's path.

    Every manifest has the columns clip_id, path (relative to out_dir), label and split (db|query)."""
    if name in ("gm", "gm-small"):
        return render_dataset(out_dir, "full" if name == "gm" else "small", seed)
    if name in recordings.REAL_DATASETS:
        return recordings.build(name, out_dir, seed)
    raise AudiohashError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m audiohash.dataset", description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print the datasets, one a line, and exit")
    ap.add_argument("--name", default=None, help=f"the dataset to build, of {', '.join(DATASETS)} "
                                                 "(default: gm, or gm-small with --small)")
    ap.add_argument("--out", help="output folder (reused if already built)")
    ap.add_argument("--small", action="store_true", help="the small test set instead of the full one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--banks", default=None, help=f"gm only: comma-separated, of {','.join(SOUNDFONTS)} "
                                                  "(default: all)")
    ap.add_argument("--workers", type=int, default=None, help="gm only: processes (default: min(2, cpus))")
    a = ap.parse_args(argv)
    if a.list:
        width = max(map(len, DATASETS))
        print("\n".join(f"{name:<{width}}  {text}" for name, text in DATASETS.items()))
        return
    if not a.out:
        ap.error("--out is required (or --list)")
    if a.name is not None and a.small:
        ap.error("--small means --name gm-small: give one of them")
    if a.name not in (None, "gm", "gm-small") and (a.banks is not None or a.workers is not None):
        ap.error("--banks and --workers apply to the gm datasets only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if a.name in (None, "gm", "gm-small"):
            banks = [b for b in (a.banks or ",".join(SOUNDFONTS)).split(",") if b]
            print(render_dataset(a.out, "small" if a.small or a.name == "gm-small" else "full", a.seed,
                                 banks, a.workers))
        else:
            print(build_dataset(a.name, a.out, a.seed))
    except AudiohashError as e:   # like audiohash.cli: the message and exit status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
