"""A MIDI file as the melody: its condition is the argmax chroma a clean hum of its top line would give."""

import mido
import numpy as np
import pytest
import torch

import musicgen_lite
from conditioning import ChromaConditioner, midi_chroma
from conditioning.midi_melody import read_midi_notes

SR = 32000
TEMPO_BPM = 100.0  # quarter notes per minute
# (start beat, beats, pitch) of a tune that is in no fixture: a rest of 4 beats in the middle, one leap
TUNE = [(0, 1, 67), (1, 1, 69), (2, 0.5, 71), (2.5, 0.5, 72), (3, 2, 74), (5, 1, 71), (6, 1, 67),
        (11, 1, 64), (12, 1, 66), (13, 1.5, 67), (14.5, 0.5, 62), (15, 2, 67)]
# an accompaniment below it (bass and inner chords), which the melody line must leave out
CHORDS = [(0, 4, (43, 59, 62)), (4, 3, (50, 57, 60)), (11, 2, (40, 55, 60)), (13, 4, (43, 59, 62))]


def write_midi(path, tracks: list[list[tuple[float, float, int]]], drums: bool = False, ticks: int = 480) -> None:
    """A type-1 file: a tempo track, then one track per note list (beats), on channel 9 when `drums`."""
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks)
    mid.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(TEMPO_BPM))]))
    for notes in tracks:
        events = sorted([(round(s * ticks), 1, p) for s, _, p in notes] + [(round((s + d) * ticks), 0, p) for s, d, p in notes])
        track, now = mido.MidiTrack(), 0
        for tick, on, pitch in events:
            kind = "note_on" if on else "note_off"
            track.append(mido.Message(kind, note=pitch, velocity=80 if on else 0, time=tick - now, channel=9 if drums else 0))
            now = tick
        mid.tracks.append(track)
    mid.save(str(path))


def clean_hum(notes: list[tuple[float, float, int]], seconds: float) -> np.ndarray:
    """The line sung cleanly: harmonic tones at the notes' times (seconds), silence in between."""
    wav = np.zeros(round(seconds * SR))
    for start, end, pitch in notes:
        t = np.arange(round(start * SR), round(end * SR))
        hz = 440.0 * 2.0 ** ((pitch - 69) / 12)
        fade = np.minimum(1.0, np.minimum(t - t[0], t[-1] - t) / (0.01 * SR))  # 10 ms ramps: no clicks
        wav[t] += fade * sum(a * np.sin(2 * np.pi * k * hz * t / SR) for k, a in ((1, 0.3), (2, 0.15), (3, 0.08)))
    return wav.astype(np.float32)


def beats_to_seconds(notes):
    return [(s * 60 / TEMPO_BPM, (s + d) * 60 / TEMPO_BPM, p) for s, d, p in notes]


@pytest.fixture(scope="module")
def tune(tmp_path_factory):
    root = tmp_path_factory.mktemp("midi")
    chords = [(s, d, p) for s, d, pitches in CHORDS for p in pitches]
    write_midi(root / "tune.mid", [TUNE, chords])
    write_midi(root / "line.mid", [TUNE])
    write_midi(root / "empty.mid", [])
    write_midi(root / "drums.mid", [[(0, 1, 36), (1, 1, 38)]], drums=True)
    return root


def test_notes_are_read_in_seconds_with_the_tempo(tune):
    notes, seconds = read_midi_notes(tune / "line.mid")
    assert seconds == pytest.approx(17 * 60 / TEMPO_BPM)
    np.testing.assert_allclose(sorted(notes), beats_to_seconds(TUNE), atol=1e-6)
    notes, _ = read_midi_notes(tune / "tune.mid")
    assert len(notes) == len(TUNE) + sum(len(p) for _, _, p in CHORDS)


def test_condition_matches_the_argmax_chroma_of_a_hum_of_the_line(tune):
    conditioner = ChromaConditioner(dim=16, chroma_length=10)
    seconds = 17 * 60 / TEMPO_BPM
    hum = torch.from_numpy(clean_hum(beats_to_seconds(TUNE), seconds))
    heard = conditioner.features([hum])[0].argmax(-1)  # [T]
    written = midi_chroma(tune / "tune.mid", conditioner.extractor)  # [T, 12] one-hot
    assert written.shape == (heard.shape[0], 12)
    assert torch.all(written.sum(-1) == 1)
    agree = (written.argmax(-1) == heard).float().mean().item()
    assert agree >= 0.9, agree
    # the accompaniment is not the line: a hum of the chords' top voice agrees far less often
    chord_tops = beats_to_seconds([(s, d, max(p)) for s, d, p in CHORDS])
    other = conditioner.features([torch.from_numpy(clean_hum(chord_tops, seconds))])[0].argmax(-1)
    assert (written.argmax(-1) == other).float().mean().item() < 0.6


def test_a_rest_is_read_like_silence_in_a_recording(tune):
    conditioner = ChromaConditioner(dim=16, chroma_length=10)
    written = midi_chroma(tune / "tune.mid", conditioner.extractor).argmax(-1)
    seconds = 17 * 60 / TEMPO_BPM
    silence = conditioner.features([torch.zeros(round(seconds * SR))])[0].argmax(-1)
    assert torch.all(silence == 0)  # the extractor's argmax of digital silence is bin 0 (C) ...
    rest_start, rest_end = 7 * 60 / TEMPO_BPM, 11 * 60 / TEMPO_BPM
    half = conditioner.extractor.n_fft / 2 / SR
    hop = conditioner.extractor.hop_length / SR
    inside = [t for t in range(written.shape[0]) if rest_start + half < t * hop < rest_end - half]
    assert len(inside) >= 8
    assert torch.all(written[inside] == 0)  # ... and so is a rest far from any note


@pytest.mark.parametrize("name", ["empty.mid", "drums.mid"])
def test_a_file_without_pitched_notes_is_a_one_line_error(tune, name):
    with pytest.raises(ValueError, match="no notes") as err:
        midi_chroma(tune / name, ChromaConditioner(dim=16, chroma_length=10).extractor)
    assert "\n" not in str(err.value)


def test_generation_follows_a_midi_file_like_its_hum(tune, tiny_melody_dir):
    model = musicgen_lite.load_model(tiny_melody_dir)
    seconds = 17 * 60 / TEMPO_BPM
    hum = clean_hum(beats_to_seconds(TUNE), seconds)
    kwargs = dict(duration=0.4, model=model, top_k=1, seed=0)
    by_file = musicgen_lite.generate(["waltz", "waltz"], melody=[str(tune / "tune.mid"), hum], melody_sample_rate=SR, **kwargs)
    alone = musicgen_lite.generate("waltz", melody=str(tune / "tune.mid"), **kwargs)
    features = midi_chroma(tune / "tune.mid", model.chroma.extractor)
    direct = model.generate_tokens(["waltz"], 20, musicgen_lite.sampling.SamplingParams(top_k=1),
                                   [torch.Generator().manual_seed(0)], melody=[features])
    np.testing.assert_array_equal(alone.tokens, direct.numpy())
    np.testing.assert_array_equal(by_file.tokens[:1], alone.tokens)  # a batch neighbour changes nothing
    none = musicgen_lite.generate("waltz", **kwargs)
    assert not np.array_equal(alone.tokens, none.tokens)


def test_a_midi_melody_gives_the_same_output_at_any_batch_position(tiny_default_like_dir, tmp_path):
    """On a model that computes each row apart (built like the default one), a written tune shorter
    than the chroma conditioner's window, beside a longer hum, conditions its row exactly as alone."""
    model = musicgen_lite.load_model(tiny_default_like_dir)
    write_midi(tmp_path / "short.mid", [TUNE[:3]])  # 1.5 s: fewer frames than the conditioner reads
    assert midi_chroma(tmp_path / "short.mid", model.chroma.extractor).shape[0] < model.chroma.chroma_length
    hum = clean_hum(beats_to_seconds(TUNE), 17 * 60 / TEMPO_BPM)
    kwargs = dict(duration=0.3, model=model, seed=4)
    alone = musicgen_lite.generate("folk tune", melody=str(tmp_path / "short.mid"), **kwargs)
    batch = musicgen_lite.generate(["a minuet", "folk tune"], melody=[hum, str(tmp_path / "short.mid")],
                                   melody_sample_rate=SR, **kwargs)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[1])


def test_long_generation_slides_over_the_written_tune(tune, tiny_melody_dir):
    model = musicgen_lite.load_model(tiny_melody_dir)
    model.max_duration, model.extend_stride = 0.4, 0.2
    res = musicgen_lite.generate("folk", melody=str(tune / "tune.mid"), duration=1.0, model=model, top_k=1)
    assert res.tokens.shape == (1, 4, 50)
    window = model._melody_window([midi_chroma(tune / "tune.mid", model.chroma.extractor)], frame_offset=50)
    frames = midi_chroma(tune / "tune.mid", model.chroma.extractor)
    start = round(1.0 * SR / model.chroma.extractor.hop_length)
    np.testing.assert_array_equal(window[0].numpy(), frames[start : start + window.shape[1]].numpy())


def test_cli_takes_a_midi_melody(tune, tiny_melody_dir, capsys):
    from musicgen_lite.cli import generate_main

    out = tune / "out.wav"
    code = generate_main(["--text", "waltz", "--melody", str(tune / "tune.mid"), "--duration", "0.2",
                          "--model", str(tiny_melody_dir), "--out", str(out), "--seed", "0"])
    assert code == 0 and out.is_file()
