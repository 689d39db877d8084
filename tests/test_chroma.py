"""Melody conditioning: chroma extraction against a numpy oracle, pitch sanity, tiling, melody loading."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers.audio_utils import chroma_filter_bank

from conditioning import ChromaConditioner, ChromaExtractor, argmax_bottleneck, load_melody

SR = 32000
N_FFT = 16384
HOP = 4096
C4 = 261.6255653005986


def midi_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def oracle_chroma(wav: np.ndarray, max_samples: int = 30 * SR) -> np.ndarray:
    """librosa-style chroma in float64 numpy: [B, N] -> [B, 1 + N // HOP, 12], max-normalised per frame."""
    wav = wav.astype(np.float64)[:, :max_samples]
    if wav.shape[1] < N_FFT:
        pad = N_FFT - wav.shape[1]
        wav = np.pad(wav, ((0, 0), (pad // 2, pad - pad // 2)))
    frames = 1 + wav.shape[1] // HOP
    padded = np.pad(wav, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    index = HOP * np.arange(frames)[:, None] + np.arange(N_FFT)[None]  # [T, n_fft]
    power = np.abs(np.fft.rfft(padded[:, index] * window, axis=-1)) ** 2 / np.sum(window**2)  # [B, T, F]
    filters = chroma_filter_bank(num_frequency_bins=N_FFT, num_chroma=12, sampling_rate=SR, tuning=0)
    chroma = power @ filters.T  # [B, T, 12]
    return chroma / np.maximum(chroma.max(axis=-1, keepdims=True), 1e-6)


def tone_sequence(midis: list[float], seconds: float, harmonics=(1.0, 0.5, 0.25)) -> np.ndarray:
    """Harmonic tones one after the other, phase-continuous, [len(midis) * seconds * SR]."""
    f0 = np.repeat([midi_hz(m) for m in midis], int(seconds * SR))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    return sum(a * np.sin((k + 1) * phase) for k, a in enumerate(harmonics)).astype(np.float32) * 0.3


def interior_frames(start: float, end: float, frames: int) -> list[int]:
    """Frames whose whole analysis window lies in [start, end) seconds."""
    half = N_FFT / 2 / SR
    return [t for t in range(frames) if start + half <= t * HOP / SR <= end - half]


def test_filter_bank_maps_frequencies_to_equal_tempered_pitch_classes():
    filters = chroma_filter_bank(num_frequency_bins=N_FFT, num_chroma=12, sampling_rate=SR, tuning=0)
    assert filters.shape == (12, N_FFT // 2 + 1)
    freqs = np.arange(N_FFT // 2 + 1) * SR / N_FFT
    checked = 0
    for k, f in enumerate(freqs):
        if not 100 <= f <= 4000:
            continue
        semitones = 12 * math.log2(f / C4)
        if abs(semitones - round(semitones)) > 0.3:
            continue
        assert filters[:, k].argmax() == round(semitones) % 12, f
        checked += 1
    assert checked > 1000


def test_extractor_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    melody = tone_sequence([60, 64, 67, 71, 62, 69], 0.4, harmonics=(1.0, 0.3))
    wav = np.stack([melody + 0.05 * rng.standard_normal(melody.shape), 0.2 * rng.standard_normal(melody.shape)])
    wav = wav.astype(np.float32)  # [2, 76800]
    ours = ChromaExtractor()(torch.from_numpy(wav))
    expected = oracle_chroma(wav)
    assert ours.shape == expected.shape == (2, 1 + wav.shape[1] // HOP, 12)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-5, rtol=0)


def test_extractor_pads_short_waveforms_like_transformers():
    rng = np.random.default_rng(1)
    wav = rng.standard_normal((1, 101)).astype(np.float32)  # odd padding: the extra zero goes right
    ours = ChromaExtractor()(torch.from_numpy(wav))
    assert ours.shape == (1, 1 + N_FFT // HOP, 12)
    np.testing.assert_allclose(ours.numpy(), oracle_chroma(wav), atol=2e-5, rtol=0)


def test_extractor_cuts_input_at_30_seconds():
    rng = np.random.default_rng(2)
    wav = torch.from_numpy(rng.standard_normal((1, 31 * SR)).astype(np.float32))
    extractor = ChromaExtractor()
    chroma = extractor(wav)
    assert chroma.shape == (1, 1 + 30 * SR // HOP, 12)
    torch.testing.assert_close(chroma, extractor(wav[:, : 30 * SR]))


def test_pure_a4_lands_on_bin_9():
    t = np.arange(2 * SR) / SR
    wav = torch.from_numpy(np.sin(2 * np.pi * 440.0 * t).astype(np.float32))
    features = ChromaConditioner(dim=16, chroma_length=10).features([wav])
    assert features.shape == (1, 1 + 2 * SR // HOP, 12)
    assert (features.sum(-1) == 1).all()
    assert (features.argmax(-1) == 9).all()


def test_c_major_arpeggio_pitch_classes():
    notes = [60, 64, 67, 72]  # C4 E4 G4 C5
    wav = torch.from_numpy(tone_sequence(notes, 1.0))
    features = ChromaConditioner(dim=16, chroma_length=10).features([wav])
    pitch = features.argmax(-1)[0]
    for i, (note, expected) in enumerate(zip(notes, [0, 4, 7, 0])):
        frames = interior_frames(i, i + 1, pitch.shape[0])
        assert len(frames) >= 3
        assert pitch[frames].tolist() == [expected] * len(frames), note


def hum(sample_rate: int) -> tuple[np.ndarray, list[tuple[float, float, int]]]:
    """A hummed D4 -> F#4 -> A4 with glides, vibrato, a soft attack and breath noise.

    Returns the waveform and (start, end, pitch class) of each held note.
    """
    rng = np.random.default_rng(3)
    hold, glide = 1.2, 0.25
    plan = [(62, hold), (None, glide), (66, hold), (None, glide), (69, hold)]
    midi = []
    for i, (note, seconds) in enumerate(plan):
        n = int(seconds * sample_rate)
        if note is None:
            midi.append(np.linspace(plan[i - 1][0], plan[i + 1][0], n))
        else:
            midi.append(np.full(n, float(note)))
    midi = np.concatenate(midi)
    t = np.arange(midi.shape[0]) / sample_rate
    midi = midi + 0.3 * np.sin(2 * np.pi * 5.5 * t)  # +-30 cents vibrato
    phase = 2 * np.pi * np.cumsum(midi_hz(1) * 2.0 ** ((midi - 1) / 12)) / sample_rate
    voice = sum(a * np.sin(k * phase) for k, a in zip(range(1, 6), [1.0, 0.6, 0.3, 0.15, 0.08]))
    envelope = np.minimum(1.0, t / 0.08) * np.minimum(1.0, (t[-1] - t) / 0.08)
    breath = np.convolve(rng.standard_normal(t.shape[0]), np.ones(8) / 8, mode="same")
    wav = 0.3 * envelope * voice + 0.03 * breath
    step = hold + glide
    held = [(0.0, hold, 2), (step, step + hold, 6), (2 * step, 2 * step + hold, 9)]
    return wav.astype(np.float32), held


def test_voice_like_hum_follows_the_tune(tmp_path):
    wav, held = hum(44100)
    path = tmp_path / "hum.wav"
    sf.write(path, wav, 44100)
    melody = load_melody(path)
    assert melody.dtype == torch.float32 and melody.dim() == 1
    assert abs(melody.shape[0] - round(wav.shape[0] * SR / 44100)) <= 1
    pitch = ChromaConditioner(dim=16, chroma_length=10).features([melody]).argmax(-1)[0]
    for start, end, pitch_class in held:
        frames = interior_frames(start, end, pitch.shape[0])
        assert len(frames) >= 3
        assert pitch[frames].tolist() == [pitch_class] * len(frames)
    # the whole sequence, with repeats collapsed, is the tune with at most glide frames in between
    collapsed = [p for i, p in enumerate(pitch.tolist()) if i == 0 or p != pitch[i - 1]]
    assert [p for p in collapsed if p in (2, 6, 9)][:3] == [2, 6, 9]


def test_batch_is_zero_padded_to_longest():
    short = torch.from_numpy(tone_sequence([69], 0.5))
    long = torch.from_numpy(tone_sequence([60, 67], 1.0))
    features = ChromaConditioner(dim=16, chroma_length=10).features([short, long])
    padded = np.stack([np.pad(short.numpy(), (0, long.shape[0] - short.shape[0])), long.numpy()])
    expected = oracle_chroma(padded).argmax(-1)
    assert features.shape == (2, 1 + long.shape[0] // HOP, 12)
    assert features.argmax(-1).tolist() == expected.tolist()


def test_argmax_bottleneck_is_one_hot():
    chroma = torch.tensor([[[0.1, 0.9, 0.3], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0]]])
    out = argmax_bottleneck(chroma)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[0, 1, 0], [1, 0, 0], [1, 0, 0]]]


@pytest.mark.parametrize("frames", [3, 10, 15])
def test_conditioner_projects_then_tiles_and_truncates(frames):
    torch.manual_seed(0)
    conditioner = ChromaConditioner(dim=8, chroma_length=10)
    features = argmax_bottleneck(torch.rand(2, frames, 12))
    out = conditioner(features)
    assert out.shape == (2, 10, 8)
    projected = features @ conditioner.proj.weight.T + conditioner.proj.bias  # [2, frames, 8]
    for t in range(10):
        torch.testing.assert_close(out[:, t], projected[:, t % frames])


def test_conditioner_projection_and_null_features():
    assert isinstance(ChromaConditioner(dim=12, chroma_length=4).proj, torch.nn.Identity)
    conditioner = ChromaConditioner(dim=8, chroma_length=4)
    assert isinstance(conditioner.proj, torch.nn.Linear) and conditioner.proj.in_features == 12
    null = conditioner.null_features(3, frames=2)
    assert null.shape == (3, 2, 12)
    assert null[..., 0].eq(1).all() and null[..., 1:].eq(0).all()
    with pytest.raises(ValueError):
        conditioner(torch.zeros(1, 5, 7))
    with pytest.raises(ValueError):
        conditioner.features([torch.zeros(2, 100)])


def test_load_melody_arrays_are_mixed_down_and_resampled():
    t = np.arange(16000) / 16000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)]).astype(np.float64)
    melody = load_melody(stereo, sample_rate=16000)
    assert melody.dtype == torch.float32 and melody.shape == (SR,)
    assert abs(melody.abs().max().item() - 0.5) < 0.02
    same = load_melody(torch.from_numpy(stereo[0]).float(), sample_rate=SR)
    torch.testing.assert_close(same, torch.from_numpy(stereo[0]).float())


def test_load_melody_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_melody(tmp_path / "missing.wav")
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio\n")
    with pytest.raises(ValueError, match="not an audio file"):
        load_melody(fake)
    tone = np.sin(np.arange(SR) / 5).astype(np.float32)
    with pytest.raises(ValueError, match="sample_rate is required"):
        load_melody(tone)
    with pytest.raises(ValueError, match="silent"):
        load_melody(np.zeros(SR, dtype=np.float32), sample_rate=SR)
    with pytest.raises(ValueError, match="at least"):
        load_melody(tone[:1000], sample_rate=SR)
    with pytest.raises(ValueError, match="channels"):
        load_melody(np.stack([tone, tone], axis=1), sample_rate=SR)
    with pytest.raises(ValueError, match="floating point"):
        load_melody((tone * 32767).astype(np.int16), sample_rate=SR)
    with pytest.raises(ValueError):
        load_melody([0.1, 0.2], sample_rate=SR)
