"""Captions from score metadata: tempo words, genres, composers, keys and the split of a work.

Pure helpers (numpy only): the words a person would type for a piece of music.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from ...audio_data import stable_hash

VALID_PERCENT = 5
TEST_PERCENT = 5

def ascii_words(text: str) -> list[str]:
    """Lower-case ASCII words of ``text``; camelCase and digits split apart."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", text)]


# Beats per minute a player would take for each tempo word. The beat is the
# quarter note in simple metres; ``quarter_bpm_for_word`` adapts it to others.
TEMPO_WORD_BPM = {
    "grave": 40, "largo": 48, "lento": 54, "larghetto": 60, "adagio": 66,
    "adagietto": 72, "maestoso": 80, "andante": 84, "andantino": 92,
    "moderato": 108, "allegretto": 116, "menuetto": 126, "minuetto": 126,
    "menuet": 126, "marcia": 112, "allegro": 132, "vivace": 152,
    "vivacissimo": 168, "presto": 176, "scherzo": 184, "prestissimo": 200,
}
_TEMPO_LEAD_WORDS = {"poco", "un", "molto", "assai", "tempo", "di"}
_TEMPO_TAIL_WORDS = {"molto", "assai", "non", "troppo", "ma", "con", "brio", "moto", "tanto"}
_LOCAL_TEMPO_CHANGE = re.compile(r"\ba tempo\b|\btempo (i|1|primo)\b|\bpi[uù]\b|\bmeno\b|\bcapo\b")


def tempo_phrase(text: str) -> str | None:
    """The tempo indication in a movement name or expression, lower-cased.

    ``"Menuetto. Allegretto"`` -> ``"menuetto"``, ``"Scherzo (Allegro molto)"``
    -> ``"scherzo"``, ``"Andante con moto quasi Allegretto"`` -> ``"andante con
    moto"``. Local changes (``a tempo``, ``più mosso``) are not a movement's
    tempo and give None.
    """
    for segment in re.split(r"[.,;:()\[\]/\-–—!?\"]+", text):
        if _LOCAL_TEMPO_CHANGE.search(segment.lower()):
            continue
        words = ascii_words(segment)
        hits = [i for i, w in enumerate(words) if w in TEMPO_WORD_BPM]
        if not hits:
            continue
        start = hits[0]
        while start > 0 and words[start - 1] in _TEMPO_LEAD_WORDS:
            start -= 1
        if len(words) - start <= 4:
            return " ".join(words[start:])
        end = hits[0] + 1
        while end < len(words) and end - start < 4 and (
            words[end] in TEMPO_WORD_BPM or words[end] in _TEMPO_TAIL_WORDS
        ):
            end += 1
        return " ".join(words[start:end])
    return None


def metre_beat(metre: str) -> float:
    """Length in quarter notes of the beat a listener counts in ``metre``."""
    numerator, denominator = (int(x) for x in metre.split("/"))
    if denominator == 8 and numerator % 3 == 0 and numerator > 3:
        return 1.5
    return 2.0 if denominator == 2 else 1.0


def quarter_bpm_for_word(word_bpm: float, metre: str | None) -> float:
    """Turn a tempo word's beat rate into quarter notes per minute.

    Fast pieces in 6/8 are felt in dotted quarters and slow ones in eighths;
    alla breve is felt in halves. Without this a Presto in 2/2 would crawl.
    """
    if not metre:
        return word_bpm
    numerator, denominator = (int(x) for x in metre.split("/"))
    fast = word_bpm >= 100
    if denominator == 2:
        return word_bpm * 1.5
    if denominator == 8 and numerator % 3 == 0 and numerator > 3:
        return word_bpm * (1.2 if fast else 0.75)
    if denominator >= 8:
        return word_bpm * (0.75 if fast else 0.5)
    return word_bpm


def word_bpm(phrase: str) -> float:
    """Beat rate of the first tempo word in ``phrase``."""
    return next(TEMPO_WORD_BPM[w] for w in phrase.split() if w in TEMPO_WORD_BPM)


def bpm_bucket(quarter_bpm: float, metre: str | None = None) -> str:
    """A tempo word for pieces whose score names none, from the counted beat."""
    beat_bpm = quarter_bpm / (metre_beat(metre) if metre else 1.0)
    for limit, word in ((56, "very slow"), (80, "slow"), (126, "medium tempo"), (160, "fast")):
        if beat_bpm < limit:
            return word
    return "very fast"


# Genre and form words a user would type, canonical name first, in priority
# order: when a title matches several, the first listed is the genre.
GENRE_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("string quartet", ("string quartet", "quartet", "quartett")),
    ("piano trio", ("piano trio",)),
    ("sonatina", ("sonatina", "sonatine")),
    ("sonata", ("sonata", "sonate")),
    ("concerto", ("concerto", "konzert")),
    ("concertino", ("concertino",)),
    ("symphony", ("symphony", "sinfonia", "symphonie")),
    ("chorale", ("chorale", "choral", "chorales")),
    ("hymn", ("hymn", "hymne")),
    ("minuet", ("minuet", "menuet", "menuetto", "minuetto", "menuett")),
    ("scherzo", ("scherzo",)),
    ("rondo", ("rondo", "rondeau")),
    ("fugue", ("fugue", "fuga", "fuge")),
    ("prelude", ("prelude", "praeludium", "preludio", "preludium")),
    ("invention", ("invention",)),
    ("toccata", ("toccata",)),
    ("fantasia", ("fantasia", "fantasy", "fantasie")),
    ("variations", ("variations", "variation", "variationen")),
    ("march", ("march", "marcia", "marsch", "marche")),
    ("waltz", ("waltz", "valse", "walzer")),
    ("mazurka", ("mazurka",)),
    ("polonaise", ("polonaise",)),
    ("nocturne", ("nocturne", "notturno")),
    ("etude", ("etude", "study")),
    ("impromptu", ("impromptu",)),
    ("ballade", ("ballade",)),
    ("berceuse", ("berceuse", "lullaby")),
    ("barcarolle", ("barcarolle",)),
    ("intermezzo", ("intermezzo",)),
    ("rhapsody", ("rhapsody", "rhapsodie")),
    ("romance", ("romance", "romanze")),
    ("bagatelle", ("bagatelle",)),
    ("gavotte", ("gavotte",)),
    ("sarabande", ("sarabande",)),
    ("allemande", ("allemande",)),
    ("courante", ("courante",)),
    ("bourree", ("bourree",)),
    ("gigue", ("gigue",)),
    ("partita", ("partita",)),
    ("suite", ("suite",)),
    ("rag", ("rag", "ragtime")),
    ("tango", ("tango",)),
    ("polka", ("polka",)),
    ("reel", ("reel",)),
    ("jig", ("jig",)),
    ("hornpipe", ("hornpipe",)),
    ("strathspey", ("strathspey",)),
    ("clog", ("clog",)),
    ("fling", ("fling",)),
    ("schottische", ("schottische",)),
    ("madrigal", ("madrigal", "madrigale")),
    ("motet", ("motet", "motette")),
    ("canon", ("canon",)),
    ("aria", ("aria", "arie")),
    ("kyrie", ("kyrie",)),
    ("gloria", ("gloria",)),
    ("credo", ("credo",)),
    ("sanctus", ("sanctus",)),
    ("benedictus", ("benedictus",)),
    ("agnus dei", ("agnus dei", "agnus")),
    ("folk tune", ("folk tune", "folk song", "folksong", "folk")),
    ("song", ("song", "lied", "chanson")),
)


def genre_words(text: str) -> list[str]:
    """Canonical genre/form words found in ``text``, in priority order."""
    words = ascii_words(text)
    joined = f" {' '.join(words)} "
    return [name for name, aliases in GENRE_WORDS if any(f" {a} " in joined for a in aliases)]


# Surnames in file names or MIDI metadata that identify a composer.
KNOWN_COMPOSERS = {
    name: name
    for name in (
        "albeniz bach bartok beethoven borodin brahms bruckner buxtehude byrd chopin "
        "ciconia clementi corelli couperin czerny debussy dowland dvorak elgar faure "
        "franck gershwin gherardello granados grieg handel haydn hummel janacek joplin "
        "josquin landini liszt lusitano mahler mendelssohn monteverdi mozart mussorgsky "
        "paganini palestrina poulenc prokofiev purcell rachmaninoff rameau ravel satie "
        "scarlatti schoenberg schubert schumann scriabin shostakovich sibelius smetana "
        "stravinsky tchaikovsky telemann verdi vivaldi wagner weber webern zacara"
    ).split()
} | {"haendel": "handel", "rachmaninov": "rachmaninoff", "tschaikowsky": "tchaikovsky"}


def find_composer(*texts: str) -> str:
    """The first known composer surname among the words of ``texts``, or ''."""
    for text in texts:
        for word in ascii_words(text):
            if word in KNOWN_COMPOSERS:
                return KNOWN_COMPOSERS[word]
    return ""


# Key names by number of sharps (negative: flats), -7..7.
_MAJOR_BY_SHARPS = "Cb Gb Db Ab Eb Bb F C G D A E B F# C#".split()
_MINOR_BY_SHARPS = "Ab Eb Bb F C G D A E B F# C# G# D# A#".split()
_SHARPS_BY_NAME = {n: i - 7 for i, n in enumerate(_MAJOR_BY_SHARPS)} | {
    f"{n}m": i - 7 for i, n in enumerate(_MINOR_BY_SHARPS)
}
# Krumhansl-Kessler key profiles (probe-tone ratings, index 0 = tonic): how well each scale degree fits
# a key. The one table of the project; musicgen_lite.evaluate.music uses it too.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_SIGNATURE_BONUS = 0.15  # prefer the keys the written key signature allows
_TONIC_HINT_BONUS = 0.1  # per opening/closing bass note on the tonic
_MIN_KEY_CORRELATION = 0.5  # below this the music is not clearly in a key


NATURAL_PITCH_CLASS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def tonic_pitch_class(name: str) -> int:
    """``"Eb"`` / ``"D#"`` -> 3, ``"Cb"`` -> 11: a note name's pitch class, any spelling."""
    return (NATURAL_PITCH_CLASS[name[0]] + {"#": 1, "b": -1, "": 0}[name[1:]]) % 12


def key_name(sharps: int, minor: bool) -> str:
    """``key_name(-2, False)`` -> ``"Bb major"``."""
    table = _MINOR_BY_SHARPS if minor else _MAJOR_BY_SHARPS
    return f"{table[sharps + 7]} {'minor' if minor else 'major'}"


def _sharps_for(tonic: int, minor: bool, signature: int | None) -> int:
    """Key signature of a key given by tonic pitch class, in its usual spelling."""
    major_tonic = (tonic + 3) % 12 if minor else tonic
    if signature is not None and (signature * 7) % 12 == major_tonic:
        return signature
    sharps = (major_tonic * 7) % 12
    return sharps - 12 if sharps > 6 else sharps


def estimate_key(pitch_weights: np.ndarray, signature: int | None, tonic_hints: tuple[int, ...] = ()) -> str:
    """Name the key of a pitch-class histogram, or '' when none fits.

    Correlation with the Krumhansl-Kessler profiles picks major or minor and
    the tonic. Pitch content alone confuses relative keys (Bb major / G minor
    share their notes), so the written signature and the bass notes that open
    and close the music (``tonic_hints``, pitch classes) each add a bonus,
    while modal music without a fitting signature can still win on its own.
    """
    if pitch_weights.sum() <= 0 or np.ptp(pitch_weights) == 0:
        return ""
    best: tuple[float, float, int, bool] | None = None
    for minor, profile in ((False, KK_MAJOR), (True, KK_MINOR)):
        for tonic in range(12):
            corr = float(np.corrcoef(pitch_weights, np.roll(profile, tonic))[0, 1])
            sharps = _sharps_for(tonic, minor, signature)
            score = corr + (_SIGNATURE_BONUS if sharps == signature else 0.0)
            score += _TONIC_HINT_BONUS * sum(hint == tonic for hint in tonic_hints)
            if best is None or score > best[0]:
                best = (score, corr, sharps, minor)
    assert best is not None
    _, corr, sharps, minor = best
    return key_name(sharps, minor) if corr >= _MIN_KEY_CORRELATION else ""


@dataclass
class CaptionFields:
    """What a caption says about one audio file; empty fields are left out."""

    composer: str = ""
    genre: str = ""
    form: str = ""
    tempo: str = ""  # a tempo phrase from the score, e.g. "allegro con brio"
    quarter_bpm: float | None = None  # fallback when ``tempo`` is empty
    key: str = ""
    metre: str = ""


def build_caption(fields: CaptionFields) -> str:
    """``"mozart string quartet, menuetto, G major, 3/4, piano"``.

    Composer and genre read as one phrase; a form word is dropped when the
    genre or tempo phrase already says it (menuetto already says minuet).
    """
    head = " ".join(x for x in (fields.composer, fields.genre) if x)
    tempo = fields.tempo
    if not tempo and fields.quarter_bpm:
        tempo = bpm_bucket(fields.quarter_bpm, fields.metre or None)
    form = fields.form
    if form and (form in head or form in genre_words(f"{head} {tempo}")):
        form = ""
    return ", ".join([p for p in (head, form, tempo, fields.key, fields.metre) if p] + ["piano"])


def split_for(work_id: str) -> str:
    """Deterministic train/valid/test split of a whole work by its id."""
    bucket = stable_hash(work_id) % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "valid" if bucket < TEST_PERCENT + VALID_PERCENT else "train"


def slug(text: str) -> str:
    """File-name-safe lower-case id."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "untitled"
