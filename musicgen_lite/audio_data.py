"""Training data: a folder of audio files, their captions and splits, and a cache of codec tokens.

    DIR/**/*.{wav,flac,ogg,mp3}        any layout, searched recursively
    DIR/**/name.txt                    optional caption beside name.wav
    DIR/metadata.jsonl                 optional {"path": "rel/name.wav", "text": ..., "split": ...,
                                                 "melody": "rel/hum.wav"} lines

A caption comes from metadata.jsonl when it has one for the file, else from the sidecar .txt;
a file with neither is an unconditional example. The split (train / valid / test) is the
metadata's when given, else a hash of the file's path, so a file always lands in the same split.

Audio is read in chunks of at most `chunk_seconds` and each chunk is encoded once with the codec.
The codes (and, for melody models, the per-frame argmax pitch class of the chroma) are cached in
one file per audio file, keyed on the codec's weights and the file's path, size and mtime:

    cache/tokens/<key>.pt   {"codes": [LongTensor [K, T] as int16, one per chunk]} or {"error": why}
    cache/chroma/<key>.pt   {"chroma": [ByteTensor [frames], one per chunk], "melody": [the same, of the
                             file's melody track (metadata "melody"), when it has one]}

A file soundfile cannot read is recorded as an error entry (so it is reported, not re-read, until
it changes) and skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from codebooks.audio import READ_ERRORS, read_chunks, resample, save_torch
from codebooks.codec import EncodecCodec
from conditioning.chroma import ChromaExtractor

from .checkpoints import state_digest

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
METADATA_FILE = "metadata.jsonl"
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}


class DataError(ValueError):
    """The data folder or its metadata cannot be used as given."""


@dataclass(frozen=True)
class AudioFile:
    path: Path  # absolute
    rel: str  # path relative to the data folder, '/'-separated
    caption: str | None  # None: unconditional example
    split: str  # "train" | "valid" | "test"
    melody: Path | None = None  # a hummed melody track of the same length (metadata "melody"), for melody models


@dataclass
class Clip:
    """One chunk of one file, as tokens: codes [K, T] (int16/int32) and, for melody models,
    the argmax pitch class of every chroma frame [frames] (uint8), of the mix and of the melody track."""

    file: AudioFile
    codes: Tensor
    chroma: Tensor | None
    melody: Tensor | None = None  # [frames] uint8, when the file has a melody track

    @property
    def frames(self) -> int:
        return self.codes.shape[-1]


def stable_hash(key: str) -> int:
    """A 32-bit number from the sha1 of `key`: the same on every machine and in every run (unlike hash()),
    which is what assigns a file or a work to its split."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)


def hash_split(rel: str, valid_fraction: float) -> str:
    """'valid' for about `valid_fraction` of paths, 'train' for the rest; a pure function of the path."""
    bucket = stable_hash(rel) / 16**8  # uniform in [0, 1)
    return "valid" if bucket < valid_fraction else "train"


def read_metadata(data_dir: Path) -> dict[str, dict]:
    """metadata.jsonl rows by normalised relative path (empty when the file does not exist)."""
    path = data_dir / METADATA_FILE
    if not path.is_file():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise DataError(f"{path} line {number} has no \"path\" string")
        split = row.get("split")
        if split is not None and split not in SPLIT_NAMES:
            raise DataError(f"{path} line {number}: unknown split {split!r} (use train, valid or test)")
        rows[Path(row["path"]).as_posix()] = row
    return rows


def scan(data_dir: str | Path, valid_fraction: float = 0.05) -> list[AudioFile]:
    """Every audio file under `data_dir` (sorted by relative path) with its caption and split."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    metadata = read_metadata(data_dir)
    tracks = {Path(r["melody"]).as_posix() for r in metadata.values() if isinstance(r.get("melody"), str)}
    files = []
    for path in sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        rel = path.relative_to(data_dir).as_posix()
        if rel in tracks:
            continue  # a melody track is a condition, not training audio
        row = metadata.get(rel, {})
        caption = row.get("text") if isinstance(row.get("text"), str) else None
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8", errors="replace")
        caption = " ".join(caption.split()) if caption else None
        split = SPLIT_NAMES[row["split"]] if row.get("split") else hash_split(rel, valid_fraction)
        melody = data_dir / row["melody"] if isinstance(row.get("melody"), str) else None
        files.append(AudioFile(path, rel, caption or None, split, melody if melody and melody.is_file() else None))
    if not files:
        raise DataError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {data_dir}")
    return files


class _ChunkReader(IterableDataset):
    """Yields (file index, chunk index, chunk count, wav [C, N], sample rate, error) for each chunk of
    each file; a file that fails yields one item with chunk index -1 and the reason. Worker w of W
    reads files w, w + W, ..."""

    def __init__(self, files: list[tuple[int, Path]], chunk_seconds: float):
        self.files, self.chunk_seconds = files, chunk_seconds

    def __iter__(self):
        info = get_worker_info()
        mine = self.files if info is None else self.files[info.id :: info.num_workers]
        for index, path in mine:
            try:
                for i, (wav, rate, count) in enumerate(read_chunks(path, self.chunk_seconds)):
                    yield index, i, count, wav, rate, None
            except READ_ERRORS as e:
                yield index, -1, 0, None, 0, one_line(e)


def _item(x):
    return x


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def codec_fingerprint(codec: EncodecCodec) -> str:
    """sha256 of the codec's config, codebook count and every weight: the part of a cache key that says
    "these tokens came from this codec"."""
    header = codec.model.config.to_json_string().encode() + str(codec.num_codebooks).encode()
    return state_digest(codec.model.state_dict(), header)


class TokenCache:
    """Codes (and chroma) of every file, computed once per codec / file version and read back from disk."""

    def __init__(
        self, root: str | Path, codec: EncodecCodec, chunk_seconds: float = 600.0, chroma: ChromaExtractor | None = None
    ):
        """`chroma`: the melody conditioner's extractor (its settings are used over whole chunks), or
        None when no chroma is needed."""
        if chunk_seconds <= 0:
            raise DataError(f"chunk length must be positive, got {chunk_seconds} s")
        self.root, self.codec, self.chunk_seconds = Path(root), codec, float(chunk_seconds)
        self.codec_key = codec_fingerprint(codec)
        (self.root / "tokens").mkdir(parents=True, exist_ok=True)
        self.chroma = None
        if chroma is not None:
            (self.root / "chroma").mkdir(parents=True, exist_ok=True)
            settings = (chroma.sample_rate, chroma.n_fft, chroma.hop_length, chroma.num_chroma)
            self.chroma = ChromaExtractor(*settings, chunk_length=self.chunk_seconds + 1.0)
            self.chroma_key = "|".join(map(str, settings))

    def _file_key(self, file: AudioFile) -> str:
        st = file.path.stat()
        return f"{file.rel}|{st.st_size}|{st.st_mtime_ns}|{self.chunk_seconds}"

    def token_path(self, file: AudioFile) -> Path:
        key = hashlib.sha256(f"{self.codec_key}|{self._file_key(file)}".encode()).hexdigest()[:32]
        return self.root / "tokens" / f"{key}.pt"

    def chroma_path(self, file: AudioFile) -> Path:
        track = "" if file.melody is None else f"|melody:{self._file_key(replace(file, path=file.melody))}"
        key = hashlib.sha256(f"{self.chroma_key}|{self._file_key(file)}{track}".encode()).hexdigest()[:32]
        return self.root / "chroma" / f"{key}.pt"

    def _missing(self, file: AudioFile) -> bool:
        if not self.token_path(file).is_file():
            return True
        return self.chroma is not None and not self.chroma_path(file).is_file() and not self._is_error(file)

    def _is_error(self, file: AudioFile) -> bool:
        return "error" in torch.load(self.token_path(file), weights_only=True)

    def build(self, files: list[AudioFile], rank: int = 0, world: int = 1, num_workers: int = 0) -> int:
        """Encode the files this rank owns (every world-th) that have no cache entry; returns how many.
        Chunks are read (and decoded) by `num_workers` processes while this one runs the codec."""
        todo = [(i, f.path) for i, f in enumerate(files) if i % world == rank and self._missing(f)]
        if not todo:
            return 0
        reader = DataLoader(_ChunkReader(todo, self.chunk_seconds), batch_size=None, num_workers=num_workers, collate_fn=_item)
        pending: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        failed: set[int] = set()
        for index, chunk, count, wav, rate, error in reader:
            file = files[index]
            if index in failed:  # the rest of a file whose earlier chunk failed
                continue
            if error is None:
                try:
                    codes, chroma = self._encode(wav, rate)
                except READ_ERRORS as e:
                    error = one_line(e)
            if error is not None:
                failed.add(index)
                pending.pop(index, None)
                save_torch({"error": error}, self.token_path(file))
                continue
            parts = pending.setdefault(index, ([], []))
            parts[0].append(codes)
            parts[1].append(chroma)
            if chunk == count - 1:
                codes_list, chroma_list = pending.pop(index)
                if self.chroma is not None:
                    entry = {"chroma": chroma_list}
                    if file.melody is not None:
                        try:
                            entry["melody"] = self._track_chroma(file.melody)
                        except READ_ERRORS as e:
                            save_torch({"error": f"melody track: {one_line(e)}"}, self.token_path(file))
                            continue
                    save_torch(entry, self.chroma_path(file))
                save_torch({"codes": codes_list}, self.token_path(file))
        return len(todo)

    def _encode(self, wav: Tensor, rate: int) -> tuple[Tensor, Tensor | None]:
        """wav [C, N] at `rate` -> codes [K, T] (int16 when they fit) and argmax chroma [frames] (uint8)."""
        codes = self.codec.encode(wav[None], sample_rate=rate)[0].cpu()  # [K, T]
        codes = codes.to(torch.int16 if self.codec.codebook_size <= torch.iinfo(torch.int16).max else torch.int32)
        if self.chroma is None:
            return codes, None
        device = next(self.codec.parameters()).device
        mono = wav.to(device).mean(dim=0)  # [N]
        return codes, self._pitch_classes(mono, rate)

    def _pitch_classes(self, mono: Tensor, rate: int) -> Tensor:
        """mono [N] at `rate` -> argmax chroma [frames] (uint8)."""
        return pitch_classes(mono, rate, self.chroma)

    def _track_chroma(self, path: Path) -> list[Tensor]:
        """Argmax chroma of a melody track, chunked like its audio file."""
        return track_pitch_classes(path, self.chroma, self.chunk_seconds, next(self.codec.parameters()).device)

    def load(self, files: list[AudioFile]) -> tuple[list[Clip], list[tuple[AudioFile, str]]]:
        """Clips of every readable file (one per chunk) and the (file, reason) of every skipped one."""
        clips, skipped = [], []
        for file in files:
            path = self.token_path(file)
            if not path.is_file():
                raise DataError(f"no cached tokens for {file.rel}; the cache was built for other files")
            entry = torch.load(path, weights_only=True)
            if "error" in entry:
                skipped.append((file, entry["error"]))
                continue
            chroma = torch.load(self.chroma_path(file), weights_only=True) if self.chroma is not None else {}
            mix, track = chroma.get("chroma"), chroma.get("melody")
            for i, codes in enumerate(entry["codes"]):
                clips.append(Clip(file, codes, None if mix is None else mix[i], None if track is None else track[i]))
        return clips, skipped


def pitch_classes(mono: Tensor, rate: int, extractor: ChromaExtractor) -> Tensor:
    """mono [N] at `rate` -> the argmax pitch class of every chroma frame [frames] (uint8), as the
    melody conditioner's bottleneck keeps it."""
    mono = resample(mono, rate, extractor.sample_rate)
    return extractor(mono[None])[0].argmax(dim=-1).to(torch.uint8).cpu()  # [frames]


def track_pitch_classes(path: Path, extractor: ChromaExtractor, chunk_seconds: float,
                        device: torch.device | str = "cpu") -> list[Tensor]:
    """`pitch_classes` of each chunk of at most `chunk_seconds` of an audio file (a melody track), its
    channels mixed to mono; raises one of READ_ERRORS for a file that cannot be read."""
    return [pitch_classes(wav.to(device).mean(dim=0), rate, extractor) for wav, rate, _ in read_chunks(path, chunk_seconds)]


def chroma_span(clip: Clip, start: int, frame_rate: float, chroma_rate: float, length: int, track: bool = False) -> Tensor:
    """The `length` chroma frames of a segment starting at token frame `start` of a clip: [length] pitch
    classes from the chroma frame nearest the segment's start time, tiled if the clip runs out (as the
    melody conditioner tiles a short melody). `track`: of the melody track where the clip has one."""
    pitches = clip.melody if track and clip.melody is not None else clip.chroma
    total = pitches.shape[0]
    first = min(round(start / frame_rate * chroma_rate), max(0, total - length))
    span = pitches[first : first + length]
    if span.shape[0] < length:
        span = span.repeat(math.ceil(length / span.shape[0]))[:length]
    return span
