"""Build a captioned piano dataset from symbolic scores.

Text-to-music training needs audio paired with the words a person would type.
Public-domain scores are plentiful and carry their own metadata (composer,
movement name, key, metre), so rendering them is a cheap way to get both:

    score (music21) -> MIDI forced to piano (mido) -> humanised performance
      -> SoundFont synthesis at 32 kHz (tinysoundfont) -> loudness-normalised
      wav chunks of at most ten minutes, each with a caption sidecar

The same path renders a folder of the user's own MIDI files (``--midi``).

Output layout under ``--out``::

    audio/<composer>/<piece-id>.wav   32 kHz mono 16-bit
    audio/<composer>/<piece-id>.txt   the caption
    metadata.jsonl                    one JSON line per wav
    .rendered_sources                 sources finished without failures

Whole pieces (whole works, for movement files) are held out for validation
and test by hashing their id, so no tune leaks across splits. Re-running
skips what is already there; every file is written to a temporary name and
renamed. music21, mido and tinysoundfont are imported lazily: the caption
and key helpers work without them.

    captions      words, keys and splits (numpy only)
    performance   MIDI -> timed piano notes, humanising, caption fields
    corpus        music21's corpus and MIDI folders -> pieces
    render        one piece -> wav files + captions
    build         the run: workers, ledger, command line

    python -m musicgen_lite.data.scores --out data/scores --composers bach mozart
"""

from .build import Ledger, PieceBudget, build, main, render_source, run
from .captions import (
    GENRE_WORDS,
    KNOWN_COMPOSERS,
    TEMPO_WORD_BPM,
    TEST_PERCENT,
    VALID_PERCENT,
    CaptionFields,
    ascii_words,
    bpm_bucket,
    build_caption,
    estimate_key,
    find_composer,
    genre_words,
    key_name,
    metre_beat,
    quarter_bpm_for_word,
    slug,
    split_for,
    tempo_phrase,
    word_bpm,
)
from .corpus import (
    CORPUS_RULES,
    EARLY_COLLECTIONS,
    FOLK_COLLECTIONS,
    GENRE_DEFAULT_BEAT_BPM,
    SCORE_VELOCITY_RANGE,
    Source,
    corpus_collections,
    corpus_sources,
    midi_info,
    midi_sources,
    score_info,
    score_to_midi,
)
from .performance import (
    DRUM_CHANNEL,
    Humanize,
    Note,
    Performance,
    PieceInfo,
    describe,
    force_piano,
    humanize,
    performance_from_midi,
    pitch_histogram,
)
from .render import (
    CUT_SEARCH_SECONDS,
    MAX_FILE_SECONDS,
    SAMPLE_RATE,
    Job,
    PianoSynth,
    default_soundfont,
    normalize_rms,
    piece_rng,
    render_piece,
    split_points,
    trim_silence,
    write_text,
    write_wav,
)

__all__ = [
    "CORPUS_RULES", "CUT_SEARCH_SECONDS", "DRUM_CHANNEL", "EARLY_COLLECTIONS", "FOLK_COLLECTIONS",
    "GENRE_DEFAULT_BEAT_BPM", "GENRE_WORDS", "KNOWN_COMPOSERS", "MAX_FILE_SECONDS", "SAMPLE_RATE",
    "SCORE_VELOCITY_RANGE", "TEMPO_WORD_BPM", "TEST_PERCENT", "VALID_PERCENT",
    "CaptionFields", "Humanize", "Job", "Ledger", "Note", "Performance", "PianoSynth",
    "PieceBudget", "PieceInfo", "Source",
    "ascii_words", "bpm_bucket", "build", "build_caption", "corpus_collections", "corpus_sources",
    "default_soundfont", "describe", "estimate_key", "find_composer", "force_piano", "genre_words",
    "humanize", "key_name", "main", "metre_beat", "midi_info", "midi_sources", "normalize_rms",
    "performance_from_midi", "piece_rng", "pitch_histogram", "quarter_bpm_for_word", "render_piece",
    "render_source", "run", "score_info", "score_to_midi", "slug", "split_for", "split_points",
    "tempo_phrase", "trim_silence", "word_bpm", "write_text", "write_wav",
]
