"""A local web page for generation: python app.py [--model PATH] [--port N] [--host 127.0.0.1].

Text, an optional melody (an uploaded file or a microphone recording) and the sampling controls go
in. A live player plays the audio while it is generated (at the model's own level: loudness
normalisation needs the whole clip); then a player with the result (normalised to -14 LUFS, as
generate.py writes it) and the picture of waveform, spectrogram and chromagrams come out. The
sampling controls start at the model's own defaults. The model is loaded on the first request and kept.
Needs the [demo] extra (Gradio and matplotlib). Gradio's usage analytics are switched off and the
page uses system fonts, so nothing is fetched from or sent to the internet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # gradio reads it at import time

import musicgen_lite  # noqa: E402, F401  before anything loads torch: it sets OpenMP's wait policy

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from conditioning.chroma import load_melody  # noqa: E402
from musicgen_lite.api import MAX_DURATION, generate_stream  # noqa: E402
from musicgen_lite.audio_io import LoudnessWarning, normalize_loudness, write_audio  # noqa: E402
from musicgen_lite.checkpoints import DEFAULT_MODEL_DIR, resolve_model_path  # noqa: E402
from musicgen_lite.generation_config import MUSICGEN_DEFAULTS, read_generation_defaults  # noqa: E402
from musicgen_lite.plots import plot_generation  # noqa: E402
from musicgen_lite.sampling import SamplingParams  # noqa: E402
from musicgen_lite.wav_stream import wav_bytes  # noqa: E402

LOUDNESS = -14.0  # LUFS, as generate.py writes by default
MELODY_RATE = 32000  # the chroma extractor's rate; melodies are resampled to it once, for model and plot
SYSTEM_FONTS = ["system-ui", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "monospace"]


class Generator:
    """One request from the page to files Gradio can serve. The model (a path, or None for the
    bundled default) is loaded by `generate` on first use and cached there; outputs live in a private
    temporary directory that is removed when the process ends."""

    def __init__(self, model: str | None):
        self.model = model
        self._dir = tempfile.TemporaryDirectory(prefix="musicgen_lite_app_")
        self._count = 0

    def __call__(self, text, melody, duration, top_k, top_p, temperature, cfg_coef, seed) -> Iterator[tuple]:
        """Yields (a WAV chunk for the live player, -, -) while generating, then (-, result, picture)."""
        try:
            wav = None if melody is None else load_melody(melody, target_sample_rate=MELODY_RATE).numpy()
            stream = generate_stream(
                text or "",
                melody=wav,
                melody_sample_rate=None if wav is None else MELODY_RATE,
                duration=float(duration),
                model=self.model,
                top_k=int(top_k),
                top_p=float(top_p),
                temperature=float(temperature),
                cfg_coef=float(cfg_coef),
                seed=None if seed is None or seed < 0 else int(seed),
            )
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                yield wav_bytes(chunk, stream.sample_rate), gr.skip(), gr.skip()
            with warnings.catch_warnings(record=True) as short:  # a level the limiter could not reach
                warnings.simplefilter("always", LoudnessWarning)
                audio = normalize_loudness(np.concatenate(chunks, axis=-1), stream.sample_rate, target=LOUDNESS)
            for warning in short:
                gr.Warning(str(warning.message))
            self._count += 1
            stem = Path(self._dir.name) / f"generation_{self._count}"
            audio_path = write_audio(stem.with_suffix(".wav"), audio, stream.sample_rate)
            plot_path = plot_generation(
                stem.with_suffix(".png"),
                audio,
                stream.sample_rate,
                melody=wav,
                melody_sample_rate=None if wav is None else MELODY_RATE,
                title=text.strip(),
            )
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        yield gr.skip(), str(audio_path), str(plot_path)


def sampling_defaults(model: str | None) -> SamplingParams:
    """The sampling defaults of the page's model (read from its directory, nothing loaded); MusicGen's
    when the model cannot be found, which the first request then reports."""
    try:
        return read_generation_defaults(DEFAULT_MODEL_DIR if model is None else resolve_model_path(model))
    except (ValueError, FileNotFoundError):
        return MUSICGEN_DEFAULTS


def build_app(model: str | None) -> gr.Blocks:
    """The page: inputs on the left, the players and the picture on the right."""
    defaults = sampling_defaults(model)
    with gr.Blocks(title="musicgen_lite") as page:
        gr.Markdown("# musicgen_lite\nMusic from a sentence, optionally following a hummed melody.")
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Text", placeholder="mozart sonata allegro", lines=2, elem_id="text")
                melody = gr.Audio(
                    sources=["upload", "microphone"], type="filepath", label="Melody (optional, melody models)", elem_id="melody"
                )
                duration = gr.Slider(0.5, min(30.0, MAX_DURATION), value=10.0, step=0.5, label="Duration (s)", elem_id="duration")
                with gr.Accordion("Sampling", open=True):
                    top_k = gr.Slider(1, 1000, value=defaults.top_k, step=1, label="Top-k (1 = greedy)", elem_id="top_k")
                    top_p = gr.Slider(0.0, 1.0, value=defaults.top_p, step=0.01, label="Top-p (0 = off)", elem_id="top_p")
                    temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature", elem_id="temperature")
                    cfg_coef = gr.Slider(1.0, 10.0, value=defaults.cfg_coef, step=0.1, label="Guidance (1 = off)", elem_id="cfg")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                live = gr.Audio(label="Live (while generating; not loudness-normalised)", streaming=True, autoplay=True, interactive=False, elem_id="live")
                audio = gr.Audio(label="Result", type="filepath", interactive=False, elem_id="result")
                picture = gr.Image(label="Waveform, spectrogram, chromagrams", show_label=False, type="filepath", interactive=False, elem_id="plot")
        button.click(
            Generator(model).__call__,  # the bound method: Gradio streams what a generator function yields
            inputs=[text, melody, duration, top_k, top_p, temperature, cfg_coef, seed],
            outputs=[live, audio, picture],
        )
    return page


def launch(page: gr.Blocks, host: str, port: int | None, *, block: bool = True) -> str:
    """Serve `page` with system fonts and no server-side rendering (no Node.js needed); returns its
    URL. With block=False the server runs in a background thread until `page.close()`."""
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
    _, url, _ = page.launch(server_name=host, server_port=port, theme=theme, ssr_mode=False, prevent_thread_lock=not block, quiet=not block)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description="A local web page for musicgen_lite.")
    parser.add_argument("--model", help="model directory or cached hub id (default: the bundled model)")
    parser.add_argument("--port", type=int, help="port to listen on (default: the first free one from 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    args = parser.parse_args(argv)
    launch(build_app(args.model), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
