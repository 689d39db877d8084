"""Cut one preset out of a SoundFont 2 file, so a piano travels in a few MB instead of a 140 MB bank.

A General MIDI bank holds 128+ instruments; rendering piano needs one. An SF2 file is a RIFF tree::

    RIFF 'sfbk'
      LIST 'INFO'  (names, version)                      copied as is
      LIST 'sdta'  smpl: 16-bit PCM of every sample      only the kept samples' points
      LIST 'pdta'  phdr pbag pmod pgen                    presets -> bags -> generators
                   inst ibag imod igen                    instruments -> bags -> generators
                   shdr                                   sample headers (offsets into smpl)

A preset's generators name instruments (generator 41), an instrument's name samples (53), and a
stereo sample names its partner (wSampleLink). `extract_preset` follows those links from one preset,
renumbers everything it keeps and rewrites the sample offsets, so the result plays exactly like the
original bank's preset. Only plain SF2 (PCM samples) is handled: SF3's compressed samples use
other offset rules.

    python -m musicgen_lite.data.soundfont /usr/share/sounds/sf2/FluidR3_GM.sf2 piano.sf2
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

GEN_INSTRUMENT = 41
GEN_SAMPLE_ID = 53
SAMPLE_GUARD_POINTS = 46  # the SF2 spec's zero points after each sample
LINKED_TYPES = 2 | 4 | 8  # right, left, linked sample types carry a partner in wSampleLink

# record layouts of the pdta sub-chunks (little-endian, terminal record included in each chunk)
PHDR = struct.Struct("<20sHHHIII")  # name, preset, bank, bag index, library, genre, morphology
BAG = struct.Struct("<HH")  # generator index, modulator index
MOD = struct.Struct("<HHhHH")
GEN = struct.Struct("<HH")  # operator, amount (as unsigned; signed or two bytes depending on operator)
INST = struct.Struct("<20sH")  # name, bag index
SHDR = struct.Struct("<20sIIIIIBbHH")  # name, start, end, loop start, loop end, rate, pitch, correction, link, type


class SoundFontError(ValueError):
    """The file is not a plain SF2 bank, or it has no such preset."""


def _chunks(data: bytes, start: int, end: int) -> dict[str, tuple[int, int]]:
    """{id (or LIST type): (data start, data end)} of the RIFF chunks in data[start:end]."""
    found, pos = {}, start
    while pos + 8 <= end:
        cid, size = struct.unpack_from("<4sI", data, pos)
        body = pos + 8
        name = cid.decode("latin-1")
        if name == "LIST":
            name = data[body : body + 4].decode("latin-1")
            found[name] = (body + 4, body + size)
        else:
            found[name] = (body, body + size)
        pos = body + size + (size & 1)
    return found


def _records(data: bytes, span: tuple[int, int], layout: struct.Struct) -> list[tuple]:
    return [layout.unpack_from(data, off) for off in range(span[0], span[1] - layout.size + 1, layout.size)]


def _chunk(cid: bytes, body: bytes) -> bytes:
    return struct.pack("<4sI", cid, len(body)) + body + (b"\0" if len(body) & 1 else b"")


def _list(kind: bytes, body: bytes) -> bytes:
    return _chunk(b"LIST", kind + body)


@dataclass
class _Zones:
    """Bags of one preset or instrument: each bag's generators and modulators."""

    gens: list[list[tuple]]
    mods: list[list[tuple]]


def _zones(bags: list[tuple], gens: list[tuple], mods: list[tuple], first: int, last: int) -> _Zones:
    return _Zones(
        [gens[bags[b][0] : bags[b + 1][0]] for b in range(first, last)],
        [mods[bags[b][1] : bags[b + 1][1]] for b in range(first, last)],
    )


def _pack_zones(zones: list[_Zones], remap_oper: int, remap: dict[int, int]) -> tuple[bytes, bytes, bytes, list[int]]:
    """(bag, mod, gen chunk bodies, first bag index of each zone list), terminals appended."""
    bag, mod, gen, firsts = [], [], [], []
    n_gen = n_mod = 0
    for z in zones:
        firsts.append(len(bag))
        for g_list, m_list in zip(z.gens, z.mods):
            bag.append(BAG.pack(n_gen, n_mod))
            for oper, amount in g_list:
                gen.append(GEN.pack(oper, remap[amount] if oper == remap_oper else amount))
            mod.extend(MOD.pack(*m) for m in m_list)
            n_gen, n_mod = n_gen + len(g_list), n_mod + len(m_list)
    firsts.append(len(bag))
    bag.append(BAG.pack(n_gen, n_mod))
    mod.append(MOD.pack(0, 0, 0, 0, 0))
    gen.append(GEN.pack(0, 0))
    return b"".join(bag), b"".join(mod), b"".join(gen), firsts


def extract_preset(source: str | Path, dest: str | Path, bank: int = 0, program: int = 0) -> int:
    """Write `dest`: an SF2 holding only preset (bank, program) of `source`. Returns its size in bytes."""
    data = Path(source).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"sfbk":
        raise SoundFontError(f"{source} is not a SoundFont 2 file")
    top = _chunks(data, 12, len(data))
    if not {"INFO", "sdta", "pdta"} <= top.keys():
        raise SoundFontError(f"{source} lacks an INFO, sdta or pdta list")
    sdta, pdta = _chunks(data, *top["sdta"]), _chunks(data, *top["pdta"])
    info = _chunks(data, *top["INFO"])
    if "ifil" in info and struct.unpack_from("<H", data, info["ifil"][0])[0] >= 3:
        raise SoundFontError(f"{source} is SF3 (compressed samples); use an SF2 bank")
    phdr = _records(data, pdta["phdr"], PHDR)
    pbag, pmod, pgen = (_records(data, pdta[k], s) for k, s in (("pbag", BAG), ("pmod", MOD), ("pgen", GEN)))
    inst = _records(data, pdta["inst"], INST)
    ibag, imod, igen = (_records(data, pdta[k], s) for k, s in (("ibag", BAG), ("imod", MOD), ("igen", GEN)))
    shdr = _records(data, pdta["shdr"], SHDR)

    index = next((i for i, p in enumerate(phdr[:-1]) if (p[2], p[1]) == (bank, program)), None)
    if index is None:
        raise SoundFontError(f"{source} has no preset {program} in bank {bank}")
    preset = _zones(pbag, pgen, pmod, phdr[index][3], phdr[index + 1][3])
    inst_ids = sorted({amount for g in preset.gens for oper, amount in g if oper == GEN_INSTRUMENT})
    instruments = [_zones(ibag, igen, imod, inst[i][1], inst[i + 1][1]) for i in inst_ids]
    sample_ids = {amount for z in instruments for g in z.gens for oper, amount in g if oper == GEN_SAMPLE_ID}
    todo = list(sample_ids)
    while todo:  # stereo partners
        s = todo.pop()
        if shdr[s][9] & LINKED_TYPES and shdr[s][8] not in sample_ids:
            sample_ids.add(shdr[s][8])
            todo.append(shdr[s][8])
    sample_ids = sorted(sample_ids)
    new_sample = {old: new for new, old in enumerate(sample_ids)}

    smpl_start = sdta["smpl"][0]
    points, headers, pos = [], [], 0
    for s in sample_ids:
        name, start, end, loop_start, loop_end, rate, pitch, corr, link, kind = shdr[s]
        points.append(data[smpl_start + 2 * start : smpl_start + 2 * end] + b"\0" * (2 * SAMPLE_GUARD_POINTS))
        shift = pos - start
        link = new_sample.get(link, 0) if kind & LINKED_TYPES else link
        headers.append(SHDR.pack(name, pos, end + shift, loop_start + shift, loop_end + shift, rate, pitch, corr,
                                 link, kind))
        pos += end - start + SAMPLE_GUARD_POINTS
    headers.append(SHDR.pack(b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0))

    new_inst = {old: new for new, old in enumerate(inst_ids)}
    pbag_b, pmod_b, pgen_b, p_first = _pack_zones([preset], GEN_INSTRUMENT, new_inst)
    ibag_b, imod_b, igen_b, i_first = _pack_zones(instruments, GEN_SAMPLE_ID, new_sample)
    p = phdr[index]
    phdr_b = PHDR.pack(p[0], p[1], p[2], p_first[0], 0, 0, 0) + PHDR.pack(b"EOP", 0, 0, p_first[1], 0, 0, 0)
    inst_b = b"".join(INST.pack(inst[i][0], i_first[n]) for n, i in enumerate(inst_ids))
    inst_b += INST.pack(b"EOI", i_first[-1])

    body = b"sfbk"
    body += _list(b"INFO", data[top["INFO"][0] : top["INFO"][1]])
    body += _list(b"sdta", _chunk(b"smpl", b"".join(points)))
    body += _list(b"pdta", b"".join(_chunk(cid, b) for cid, b in (
        (b"phdr", phdr_b), (b"pbag", pbag_b), (b"pmod", pmod_b), (b"pgen", pgen_b), (b"inst", inst_b),
        (b"ibag", ibag_b), (b"imod", imod_b), (b"igen", igen_b), (b"shdr", b"".join(headers)))))
    out = struct.pack("<4sI", b"RIFF", len(body)) + body
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(out)
    tmp.replace(dest)
    return len(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musicgen_lite.data.soundfont", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a SoundFont 2 bank (.sf2)")
    p.add_argument("dest", help="the one-preset .sf2 to write")
    p.add_argument("--bank", type=int, default=0)
    p.add_argument("--program", type=int, default=0, help="General MIDI program (0: acoustic grand piano)")
    args = p.parse_args(argv)
    try:
        size = extract_preset(args.source, args.dest, args.bank, args.program)
    except (OSError, SoundFontError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
