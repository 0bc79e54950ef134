"""Read the recorded samples out of a SoundFont 2 file, with the keys and velocities that play them.

No synthesis: a SoundFont's `smpl` chunk holds the recordings themselves (16-bit PCM), `shdr`
says where each one starts and ends, and the preset and instrument zones of `pdta` say which
keys and velocities play which sample. `read_sf2` returns one `Sf2Zone` per (preset zone,
instrument zone) that plays a sample, with that sample's PCM.

Layout (SoundFont 2.04 spec, sections 4-7): RIFF 'sfbk' holding LIST 'INFO', LIST 'sdta'
(`smpl`) and LIST 'pdta' (`phdr pbag pmod pgen inst ibag imod igen shdr`, fixed-size records,
each list ending in a terminal record). A preset's zones are `pbag[phdr[i].bag:phdr[i+1].bag]`,
a zone's generators `pgen[pbag[z].gen:pbag[z+1].gen]`; instruments the same through inst/ibag/igen.
A first zone without an instrument (preset) or sample (instrument) generator is the global zone:
its key and velocity ranges are the defaults of the other zones.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from audiohash.errors import AudiohashError

# Generator operators used here (spec section 8.1.2); the others do not move which sample plays.
GEN_KEY_RANGE, GEN_VEL_RANGE, GEN_INSTRUMENT, GEN_SAMPLE_ID = 43, 44, 41, 53
MONO, ROM = 1, 0x8000   # sampleType values: 1 mono, 2 right, 4 left, 8 linked; 0x8000 flags ROM
_RECORDS = {  # pdta sub-chunk -> struct format of one record
    b"phdr": "<20sHHHIII", b"pbag": "<HH", b"pgen": "<HH", b"inst": "<20sH", b"ibag": "<HH",
    b"igen": "<HH", b"shdr": "<20sIIIIIBbHH",
}


@dataclass(frozen=True)
class Sf2Zone:
    """One sample as a preset plays it: keys [key_lo, key_hi] at velocities [vel_lo, vel_hi]."""
    preset: str
    bank: int
    program: int
    instrument: str
    sample_index: int       # index into shdr: the same recording can be played by several zones
    sample_name: str
    sample_rate: int        # Hz
    sample_type: int        # 1 = mono (see MONO)
    pcm: np.ndarray         # int16 (n,), a view of the file's bytes
    key_lo: int
    key_hi: int
    vel_lo: int
    vel_hi: int


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1").strip()


def _chunks(data: bytes, start: int, end: int, where: str):
    """(chunk id, data offset, size) of each RIFF chunk in data[start:end]."""
    while start + 8 <= end:
        cid, size = struct.unpack_from("<4sI", data, start)
        if start + 8 + size > end:
            raise AudiohashError(f"{where}: chunk {cid!r} at byte {start} runs past its parent")
        yield cid, start + 8, size
        start += 8 + size + (size & 1)   # chunks are word-aligned


def _zones(bags, gens, first: int, stop: int, terminal_gen: int) -> list[dict]:
    """The zones bags[first:stop] as {generator: amount}; a leading global zone (one without
    terminal_gen) is merged into the others as defaults and not returned on its own."""
    zones = [dict(gens[bags[z][0]:bags[z + 1][0]]) for z in range(first, stop)]
    if zones and terminal_gen not in zones[0]:
        default, zones = zones[0], zones[1:]
        zones = [{**default, **z} for z in zones]
    return [z for z in zones if terminal_gen in z]


def _range(zone: dict, gen: int) -> tuple[int, int]:
    amount = zone.get(gen, 0x7F00)   # default: lo 0, hi 127
    return amount & 0xFF, amount >> 8


def read_sf2(data: bytes, where: str = "sf2") -> list[Sf2Zone]:
    """Every (preset zone, instrument zone) of a SoundFont 2 file that plays a sample.

    data: the whole .sf2 file. where: its name, for error messages.
    Key and velocity ranges are the intersection of the preset and instrument zones' ranges;
    zones whose intersection is empty are left out. Raises AudiohashError on a file that is not
    a SoundFont or whose records point outside their tables or the sample data."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"sfbk":
        raise AudiohashError(f"{where}: not a SoundFont 2 file (no RIFF 'sfbk' header)")
    lists = {}
    for cid, off, size in _chunks(data, 12, min(len(data), 8 + struct.unpack_from("<I", data, 4)[0]), where):
        if cid == b"LIST" and size >= 4:
            lists[data[off:off + 4]] = {c: (o, s) for c, o, s in _chunks(data, off + 4, off + size, where)}
    pdta, sdta = lists.get(b"pdta", {}), lists.get(b"sdta", {})
    missing = [c.decode() for c in _RECORDS if c not in pdta] + ([] if b"smpl" in sdta else ["smpl"])
    if missing:
        raise AudiohashError(f"{where}: SoundFont lacks chunk(s) {missing}")
    tables = {}
    for cid, fmt in _RECORDS.items():
        off, size = pdta[cid]
        n = struct.calcsize(fmt)
        if size % n or size < n:
            raise AudiohashError(f"{where}: chunk {cid.decode()} holds {size} bytes, not whole {n}-byte records")
        tables[cid] = [struct.unpack_from(fmt, data, off + i * n) for i in range(size // n)]
    smpl_off, smpl_size = sdta[b"smpl"]
    pcm = np.frombuffer(data, dtype="<i2", count=smpl_size // 2, offset=smpl_off)
    phdr, pbag, pgen = tables[b"phdr"], tables[b"pbag"], tables[b"pgen"]
    inst, ibag, igen, shdr = tables[b"inst"], tables[b"ibag"], tables[b"igen"], tables[b"shdr"]
    out = []
    try:
        for p in range(len(phdr) - 1):   # the last record of each table is a terminal one
            pname, program, bank, bag = _name(phdr[p][0]), phdr[p][1], phdr[p][2], phdr[p][3]
            for pz in _zones(pbag, pgen, bag, phdr[p + 1][3], GEN_INSTRUMENT):
                i = pz[GEN_INSTRUMENT]
                if i >= len(inst) - 1:
                    raise AudiohashError(f"{where}: preset {pname!r} names instrument {i} of {len(inst) - 1}")
                for iz in _zones(ibag, igen, inst[i][1], inst[i + 1][1], GEN_SAMPLE_ID):
                    s = iz[GEN_SAMPLE_ID]
                    if s >= len(shdr) - 1:
                        raise AudiohashError(f"{where}: instrument {_name(inst[i][0])!r} names sample {s} of {len(shdr) - 1}")
                    (plo, phi), (ilo, ihi) = _range(pz, GEN_KEY_RANGE), _range(iz, GEN_KEY_RANGE)
                    (pvl, pvh), (ivl, ivh) = _range(pz, GEN_VEL_RANGE), _range(iz, GEN_VEL_RANGE)
                    key, vel = (max(plo, ilo), min(phi, ihi)), (max(pvl, ivl), min(pvh, ivh))
                    if key[0] > key[1] or vel[0] > vel[1]:
                        continue
                    sname, start, end, rate, stype = _name(shdr[s][0]), shdr[s][1], shdr[s][2], shdr[s][5], shdr[s][9]
                    if not start < end <= len(pcm):
                        raise AudiohashError(f"{where}: sample {sname!r} spans [{start}, {end}) outside "
                                             f"the {len(pcm)} samples of smpl")
                    out.append(Sf2Zone(pname, bank, program, _name(inst[i][0]), s, sname, rate, stype,
                                       pcm[start:end], key[0], key[1], vel[0], vel[1]))
    except IndexError as e:   # a bag or generator index past its table
        raise AudiohashError(f"{where}: a zone points outside its table ({e})") from e
    return out
