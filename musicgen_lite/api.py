"""The public entry points: `generate`, `generate_continuation`, `generate_stream` and `GenerationResult`.

Every argument is checked before any work starts, so bad input costs nothing and writes nothing.
Sampling arguments left at None take the model's own defaults (`MusicGen.generation_defaults`);
`threads` sets the intra-op threads of the whole call (None: torch's own count, and for the decoding
loop `TransformerLM.decoding_threads()`: all of them, or for a small model one or all, whichever is faster).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from codebooks.streaming import StreamingDecoder
from conditioning.chroma import load_melody
from conditioning.midi_melody import is_midi, midi_chroma

from .audio_io import write_audio_files
from .checkpoints import load_default_model, load_model
from .generation_config import sampling_overrides
from .model import MusicGen
from .threads import check_threads, intra_op_threads

MAX_DURATION = 600.0  # seconds; beyond this a request is almost certainly a mistake
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds


@dataclass
class GenerationResult:
    audio: np.ndarray  # [B, channels, samples] float32
    sample_rate: int
    tokens: np.ndarray  # [B, K, frames] int64
    texts: list[str]

    def save(self, path: str | Path, *, loudness: float | None = None, subtype: str = "PCM_16") -> list[Path]:
        """Write .wav or .flac file(s): `path` for one output, `stem_0.wav`, `stem_1.wav`, ... for a batch.

        `loudness` (LUFS, e.g. -14) normalises each file with a -1 dBTP peak ceiling; the default
        keeps the model's own level. `subtype` "FLOAT" writes 32-bit float WAV.
        """
        return write_audio_files(output_paths(path, len(self.audio)), list(self.audio), self.sample_rate, subtype=subtype, loudness=loudness)


def output_paths(path: str | Path, count: int) -> list[Path]:
    """Where `count` outputs go: `path` for one, `stem_0.wav`, `stem_1.wav`, ... beside it for more."""
    path = Path(path)
    return [path] if count == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


class AudioStream:
    """What `generate_stream` returns: an iterator of float32 [channels, samples] chunks that knows,
    before the first one is made, the clip's `sample_rate`, `channels` and total `samples`."""

    def __init__(self, chunks: Iterator[np.ndarray], sample_rate: int, channels: int, samples: int):
        self._chunks = chunks
        self.sample_rate, self.channels, self.samples = sample_rate, channels, samples

    def __iter__(self) -> AudioStream:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._chunks)


@lru_cache(maxsize=2)
def _cached_model(key: str) -> MusicGen:
    return load_default_model() if key == "" else load_model(key)


def get_model(model: MusicGen | str | Path | None) -> MusicGen:
    """A model object, a path / hub id (loaded once and cached), or None for the bundled default."""
    if isinstance(model, MusicGen):
        return model
    if model is None:
        return _cached_model("")
    if isinstance(model, (str, Path)):
        return _cached_model(str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else str(model))
    raise ValueError(f"model must be a MusicGen, a path or None, got {type(model).__name__}")


def _texts(text) -> list[str]:
    items = [text] if isinstance(text, str) else text
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("text must be a non-empty string or a non-empty list of strings")
    for t in items:
        if not isinstance(t, str):
            raise ValueError(f"text items must be strings, got {type(t).__name__}")
        if not t.strip():
            raise ValueError("text is empty")
    return [t.strip() for t in items]


def _duration(duration) -> float:
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not np.isfinite(duration):
        raise ValueError(f"duration must be a number of seconds, got {duration!r}")
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if duration > MAX_DURATION:
        raise ValueError(f"duration {duration} s is beyond the {MAX_DURATION:.0f} s limit")
    return float(duration)


def _checked(text, duration, top_k, top_p, temperature, cfg_coef) -> tuple[list[str], float, dict]:
    """The arguments every entry point shares, checked before any work starts; the sampling ones as
    the overrides of the model's defaults that the caller gave."""
    overrides = sampling_overrides(top_k=top_k, top_p=top_p, temperature=temperature, cfg_coef=cfg_coef)
    return _texts(text), _duration(duration), overrides


def _broadcast(texts: list[str], items: list, what: str) -> tuple[list[str], list]:
    if len(items) == len(texts):
        return texts, items
    if len(texts) == 1:
        return texts * len(items), items
    if len(items) == 1:
        return texts, items * len(texts)
    raise ValueError(f"got {len(texts)} texts and {len(items)} {what}; give one, or one per text")


def _seeds(seed, batch: int) -> list[int]:
    """One seed per row. An integer seeds every row alike, so a prompt gives the same output wherever
    it sits in a batch; a list gives each row its own seed; None draws a fresh seed per row."""
    seeds = [secrets.randbits(62) for _ in range(batch)] if seed is None else seed
    if not isinstance(seeds, (list, tuple)):
        seeds = [seeds] * batch
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} outputs")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seed must be an integer or a list of integers, got {s!r}")
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1 = {MAX_SEED}, got {s}")
    return [int(s) for s in seeds]


def _generators(seed, batch: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in _seeds(seed, batch)]


def _result(model: MusicGen, tokens: torch.Tensor, texts: list[str]) -> GenerationResult:
    with torch.no_grad():  # row by row: a row's audio must not depend on its neighbours in the batch
        audio = torch.cat([model.codec.decode(row[None]) for row in tokens])
    return GenerationResult(
        audio=audio.float().cpu().numpy().astype(np.float32),
        sample_rate=model.sample_rate,
        tokens=tokens.cpu().numpy().astype(np.int64),
        texts=texts,
    )


def check_request(text, duration, top_k, top_p, temperature, cfg_coef, melody=None, seed=None):
    """(texts, duration, sampling overrides, melodies or None) for a generation request, or a one-line
    ValueError / FileNotFoundError; nothing is loaded, so callers can check before loading a model."""
    texts, duration, overrides = _checked(text, duration, top_k, top_p, temperature, cfg_coef)
    items = None
    if melody is not None:
        items = list(melody) if isinstance(melody, (list, tuple)) else [melody]
        if not items:
            raise ValueError("melody list is empty")
        texts, items = _broadcast(texts, items, "melodies")
        for m in items:
            if isinstance(m, (str, Path)) and Path(m).is_dir():
                raise ValueError(f"melody {m} is a folder, not an audio file")
            if isinstance(m, (str, Path)) and not Path(m).is_file():
                raise FileNotFoundError(f"melody file {m} does not exist")
    _seeds(seed, len(texts))
    return texts, duration, overrides, items


def _melody_waveforms(model: MusicGen, melodies: list | None, melody_sample_rate: int | None) -> list | None:
    """The melodies as mono waveforms at the model's chroma rate (a MIDI file's melody line as one-hot
    chroma), or None."""
    if melodies is None:
        return None
    if not model.has_melody:
        raise ValueError("this model has no melody conditioning; use a MusicGen-Melody-style model")
    extractor = model.chroma.extractor
    return [midi_chroma(m, extractor) if is_midi(m) else load_melody(m, melody_sample_rate, extractor.sample_rate)
            for m in melodies]


def generate(
    text: str | list[str],
    *,
    melody=None,
    melody_sample_rate: int | None = None,
    duration: float = 10.0,
    model: MusicGen | str | Path | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    cfg_coef: float | None = None,
    seed: int | list[int] | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> GenerationResult:
    """Music from text, optionally following a melody (an audio or MIDI path, a waveform with
    `melody_sample_rate`, or a list of them); a MIDI file's melody line stands for a hum of it.

    frames = round(duration * frame_rate); the audio has frames * hop samples. top_k=1 is greedy.
    """
    texts, duration, overrides, melodies = check_request(text, duration, top_k, top_p, temperature, cfg_coef, melody, seed)
    generators = _generators(seed, len(texts))
    threads = check_threads(threads)
    with intra_op_threads(threads):
        musicgen = get_model(model)
        wavs = _melody_waveforms(musicgen, melodies, melody_sample_rate)
        frames = max(1, round(duration * musicgen.frame_rate))
        params = musicgen.sampling_params(overrides)
        tokens = musicgen.generate_tokens(texts, frames, params, generators, melody=wavs, progress=progress, threads=threads)
        return _result(musicgen, tokens, texts)


def generate_continuation(
    prompt_audio,
    prompt_sample_rate: int,
    *,
    text: str | list[str],
    duration: float = 10.0,
    model: MusicGen | str | Path | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    cfg_coef: float | None = None,
    seed: int | list[int] | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> GenerationResult:
    """Continue `prompt_audio` ([samples], [channels, samples] or [B, channels, samples]) to `duration`
    seconds in total; the result starts with the (re-encoded) prompt."""
    texts, duration, overrides = _checked(text, duration, top_k, top_p, temperature, cfg_coef)
    threads = check_threads(threads)
    if isinstance(prompt_sample_rate, bool) or not isinstance(prompt_sample_rate, int) or prompt_sample_rate <= 0:
        raise ValueError(f"prompt_sample_rate must be a positive integer, got {prompt_sample_rate!r}")
    wav = torch.as_tensor(np.asarray(prompt_audio, dtype=np.float32)) if not torch.is_tensor(prompt_audio) else prompt_audio.float()
    if wav.dim() == 1:
        wav = wav[None, None]
    elif wav.dim() == 2:
        wav = wav[None]
    if wav.dim() != 3 or wav.shape[-1] == 0:
        raise ValueError(f"prompt_audio must be [samples], [channels, samples] or [B, channels, samples], got {tuple(wav.shape)}")
    texts, rows = _broadcast(texts, list(wav), "prompts")
    wav = torch.stack(rows)
    with intra_op_threads(threads):
        musicgen = get_model(model)
        prompt = musicgen.codec.encode(wav, prompt_sample_rate)  # [B, K, P]
        frames = max(1, round(duration * musicgen.frame_rate))
        if prompt.shape[-1] >= frames:
            raise ValueError(f"the prompt ({prompt.shape[-1] / musicgen.frame_rate:.2f} s) is not shorter than duration {duration} s")
        generators = _generators(seed, len(texts))
        params = musicgen.sampling_params(overrides)
        tokens = musicgen.generate_tokens(texts, frames, params, generators, prompt=prompt, progress=progress, threads=threads)
        return _result(musicgen, tokens, texts)


def generate_stream(
    text: str,
    *,
    melody=None,
    melody_sample_rate: int | None = None,
    duration: float = 10.0,
    model: MusicGen | str | Path | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    cfg_coef: float | None = None,
    seed: int | None = None,
    threads: int | None = None,
    chunk_seconds: float = 1.0,
) -> AudioStream:
    """`generate()`'s audio for one prompt, as float32 [channels, samples] chunks while it is generated:
    the first after about a quarter of `chunk_seconds` of codes, the next ones twice as long, up to
    `chunk_seconds`. Concatenated, the chunks have the length of `generate()`'s audio for the same
    arguments and sound the same (the tokens are identical with the same seed; each chunk is decoded
    from a window of codes around it, see codebooks/streaming.py). No loudness normalisation.

    Arguments are checked and the model is loaded when this is called; the work happens as the
    chunks are taken. `threads` holds while a chunk is being made."""
    texts, duration, overrides, melodies = check_request(text, duration, top_k, top_p, temperature, cfg_coef, melody, seed)
    if len(texts) != 1:
        raise ValueError(f"generate_stream makes one output; got {len(texts)} texts or melodies")
    if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, (int, float)) or not chunk_seconds > 0 or not np.isfinite(chunk_seconds):
        raise ValueError(f"chunk_seconds must be a positive number of seconds, got {chunk_seconds!r}")
    generators = _generators(seed, 1)
    threads = check_threads(threads)
    with intra_op_threads(threads):
        musicgen = get_model(model)
        wavs = _melody_waveforms(musicgen, melodies, melody_sample_rate)
    params = musicgen.sampling_params(overrides)
    frames = max(1, round(duration * musicgen.frame_rate))
    chunk_frames = max(1, round(chunk_seconds * musicgen.frame_rate))
    first = max(1, chunk_frames // 4)
    pieces = musicgen.stream_tokens(texts, frames, params, generators, melody=wavs, threads=threads, chunk_frames=1)
    decoding = torch.get_num_threads() if threads is None else threads  # the caller's, not the sampling loop's last choice
    chunks = _on_threads(_decoded(musicgen, pieces, first, chunk_frames, decoding), threads)
    return AudioStream(chunks, musicgen.sample_rate, musicgen.codec.channels, frames * musicgen.codec.hop_length)


def _decoded(model: MusicGen, pieces: Iterator[torch.Tensor], first: int, chunk: int, threads: int) -> Iterator[np.ndarray]:
    """[1, K, n] code pieces -> float32 [channels, samples] audio chunks, decoded on `threads`. The first
    chunk is decoded once `first` frames are in, and each next one after twice as many as the last, up
    to `chunk`: sound starts early, and while generation runs at least twice as fast as playback, each
    chunk is ready before the one before it has played."""
    decoder = StreamingDecoder(model.codec, piece_frames=chunk)
    waiting, target = [], first  # pieces not yet decoded; frames that make the next chunk
    for piece in pieces:
        waiting.append(piece)
        if sum(p.shape[-1] for p in waiting) >= target:
            with intra_op_threads(threads):
                audio = decoder.push(torch.cat(waiting, dim=-1))
            waiting, target = [], min(2 * target, chunk)
            if audio.shape[-1]:
                yield audio[0].float().cpu().numpy()
    with intra_op_threads(threads):
        rest = [decoder.push(torch.cat(waiting, dim=-1))] if waiting else []
        audio = torch.cat([*rest, decoder.flush()], dim=-1)
    if audio.shape[-1]:
        yield audio[0].float().cpu().numpy()


def _on_threads(items: Iterator, threads: int | None) -> Iterator:
    """`items`, each made with torch's intra-op threads set to `threads` and restored before it is handed out."""
    while True:
        with intra_op_threads(threads):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item
