"""One piece to audio files: SoundFont piano synthesis, loudness, cutting, and atomic wav + caption writes."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codebooks.audio import replacing

from .captions import build_caption, split_for
from .performance import Performance, PieceInfo, describe, humanize

SAMPLE_RATE = 32_000
MAX_FILE_SECONDS = 600.0  # no output file is longer than this
CUT_SEARCH_SECONDS = 15.0  # look this far back from an even split for a quiet cut
RELEASE_TAIL_SECONDS = 2.5  # let the last notes ring out
TARGET_RMS = 10 ** (-20 / 20)  # loudness of the active (non-silent) part
PEAK_CEILING = 10 ** (-1 / 20)  # never louder than -1 dBFS, so never clipped
SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/sounds/sf3/default-GM.sf3",
)


def default_soundfont() -> str | None:
    """The best General MIDI SoundFont installed here, or None."""
    import importlib.util

    candidates = list(SOUNDFONT_CANDIDATES)
    spec = importlib.util.find_spec("pretty_midi")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "TimGM6mb.sf2"))
    return next((c for c in candidates if Path(c).is_file()), None)


class PianoSynth:
    """A SoundFont piano (program 0 on every channel) that renders Performances."""

    def __init__(self, soundfont: str, sample_rate: int = SAMPLE_RATE):
        import tinysoundfont

        self.sample_rate = sample_rate
        self.synth = tinysoundfont.Synth(samplerate=sample_rate)
        self.font = self.synth.sfload(soundfont)

    def render(self, perf: Performance) -> np.ndarray:
        """Mono float32 audio of the performance, with the release tail."""
        synth, sr = self.synth, self.sample_rate
        synth.sounds_off()
        for channel in range(16):
            synth.control_change(channel, 121, 0)  # reset controllers left by the last piece
            synth.program_select(channel, self.font, 0, 0)
        events: list[tuple[float, int, int, int, int]] = []
        for n in perf.notes:
            events += [(n.start, 2, n.channel, n.pitch, n.velocity), (n.end, 1, n.channel, n.pitch, 0)]
        events += [(t, 0, ch, cc, value) for t, ch, cc, value in perf.controls]
        events.sort()
        total = int(math.ceil((perf.duration + RELEASE_TAIL_SECONDS) * sr))
        out = np.zeros(total, dtype=np.float32)
        done = 0

        def advance(to: int) -> None:
            nonlocal done
            while done < to:
                n = min(to - done, 65_536)
                block = np.frombuffer(synth.generate_simple(n), dtype=np.float32)
                out[done : done + n] = block.reshape(n, 2).mean(axis=1)
                done += n

        for t, kind, channel, a, b in events:
            advance(min(total, int(round(t * sr))))
            if kind == 2:
                synth.noteon(channel, a, b)
            elif kind == 1:
                synth.noteoff(channel, a)
            else:
                synth.control_change(channel, a, b)
        advance(total)
        synth.sounds_off()
        return out


def normalize_rms(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Scale to a common loudness with headroom.

    SoundFonts differ by 20 dB (tinysoundfont plays .sf3 fonts quietly), so
    the RMS of the sounding part is brought to -20 dBFS unless that would push
    the peak above -1 dBFS; then the peak decides. Raises on silence.
    """
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-6:
        raise ValueError("rendered audio is silent")
    frame = sample_rate // 20
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame) if len(audio) >= frame else audio[None]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    active = rms[rms > peak * 10 ** (-50 / 20)]
    loudness = float(np.sqrt(np.mean(active**2))) if active.size else peak
    return (audio * min(TARGET_RMS / loudness, PEAK_CEILING / peak)).astype(np.float32)


def trim_silence(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, floor_db: float = -60.0) -> np.ndarray:
    """Drop the inaudible end of the release tail, keeping 0.2 s."""
    loud = np.flatnonzero(np.abs(audio) > np.max(np.abs(audio)) * 10 ** (floor_db / 20))
    end = int(loud[-1]) + int(0.2 * sample_rate) if loud.size else 0
    return audio[: min(len(audio), end)]


def split_points(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_FILE_SECONDS) -> list[int]:
    """Sample indices where a long rendering is cut into files <= max_seconds.

    Cuts fall at the quietest 50 ms in the CUT_SEARCH_SECONDS before evenly
    spaced points, so no file exceeds the limit and few cuts land mid-note.
    """
    limit = int(max_seconds * sample_rate)
    if len(audio) <= limit:
        return []
    search = int(CUT_SEARCH_SECONDS * sample_rate)
    count = math.ceil(len(audio) / (limit - search))
    frame = sample_rate // 20
    cuts = []
    for i in range(1, count):
        target = i * len(audio) // count
        window = audio[target - search : target]
        energy = np.add.reduceat(window.astype(np.float64) ** 2, np.arange(0, len(window), frame))
        cuts.append(target - search + int(np.argmin(energy)) * frame)
    return cuts


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit mono wav, written atomically."""
    import soundfile

    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        soundfile.write(str(tmp), pcm, sample_rate, subtype="PCM_16", format="WAV")


def write_text(path: Path, text: str) -> None:
    """UTF-8 text file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    """Settings shared by every piece of one run."""

    out: str
    soundfont: str
    seed: int = 0
    variants: int = 0  # augmented renderings per excerpt (augment.py); 0: each piece once, whole
    excerpt_seconds: float = 12.0  # rendered length of an augmented excerpt
    export_midi: bool = False  # write piano MIDI + caption sidecars instead of audio


_SYNTHS: dict[str, PianoSynth] = {}  # one loaded SoundFont per process


def _synth(soundfont: str) -> PianoSynth:
    if soundfont not in _SYNTHS:
        _SYNTHS[soundfont] = PianoSynth(soundfont)
    return _SYNTHS[soundfont]


def piece_rng(seed: int, piece_id: str) -> np.random.Generator:
    """The same piece and seed always get the same humanisation."""
    digest = hashlib.sha256(f"{seed}:{piece_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render_piece(perf: Performance, info: PieceInfo, job: Job) -> list[dict[str, Any]]:
    """Render one performance to wav files + captions; return their metadata rows."""
    if not perf.notes:
        raise ValueError("no pitched notes")
    perf = humanize(perf, piece_rng(job.seed, info.piece_id))
    audio = normalize_rms(trim_silence(_synth(job.soundfont).render(perf)))
    bounds = [0, *split_points(audio), len(audio)]
    split = split_for(info.work_id)
    rows = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        name = info.piece_id if len(bounds) == 2 else f"{info.piece_id}-part{i + 1}"
        wav = Path(job.out) / "audio" / info.folder / f"{name}.wav"
        end = b / SAMPLE_RATE if b < len(audio) else max(b / SAMPLE_RATE, perf.duration)
        caption = build_caption(describe(perf, info, a / SAMPLE_RATE, end))
        write_wav(wav, audio[a:b])
        write_text(wav.with_suffix(".txt"), caption + "\n")
        rows.append({
            "path": wav.relative_to(job.out).as_posix(),
            "text": caption,
            "piece": info.piece_id,
            "split": split,
            "seconds": round((b - a) / SAMPLE_RATE, 3),
            "composer": info.composer or info.folder,
            "source": info.source,
        })
    return rows


def export_midi(midi_file: Any, info: PieceInfo, job: Job) -> list[dict[str, Any]]:
    """Write a score's piano MIDI and its caption context (``midi/<folder>/<id>.mid`` + ``.json``).

    `--midi` reads the sidecar back, so captions, genres and splits survive the trip.
    """
    import dataclasses
    import io
    import json

    path = Path(job.out) / "midi" / info.folder / f"{info.piece_id}.mid"
    buffer = io.BytesIO()
    midi_file.save(file=buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    write_text(path.with_suffix(".json"), json.dumps(dataclasses.asdict(info)))
    return [{"path": path.relative_to(job.out).as_posix(), "text": " ".join(filter(None, (info.composer, info.genre))),
             "piece": info.piece_id, "split": split_for(info.work_id), "seconds": round(midi_file.length, 3),
             "composer": info.composer or info.folder, "source": info.source}]
