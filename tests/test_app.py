"""The local web page (app.py): end to end in a headless Chromium, and its error handling.

The browser test needs the [demo] extra, playwright and a system Chromium (Debian's `chromium`);
playwright drives that binary directly, so no browser download is involved.
"""

import importlib.util
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

gr = pytest.importorskip("gradio", reason="the web page needs the [demo] extra (gradio)")
pytest.importorskip("matplotlib", reason="the web page needs the [demo] extra (matplotlib)")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 45_000  # the first request loads the model; bounded so a hang fails instead of stalling CI


def load_app():
    """app.py is a script at the repository root, not part of the package."""
    spec = importlib.util.spec_from_file_location("musicgen_lite_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app()


def test_errors_reach_the_page_as_messages_and_the_model_loads_lazily(app, tiny_musicgen_dir, tmp_path):
    from hum import synth_hum

    missing = app.Generator(str(tmp_path / "no_model"))  # nothing is loaded until a request comes
    with pytest.raises(gr.Error, match="does not exist"):
        list(missing("piano", None, 0.5, 250, 0.0, 1.0, 3.0, 0))
    hum = tmp_path / "hum.wav"
    sf.write(hum, synth_hum([60, 64]), 32000)
    text_only = app.Generator(str(tiny_musicgen_dir))
    with pytest.raises(gr.Error, match="no melody conditioning"):
        list(text_only("piano", str(hum), 0.5, 250, 0.0, 1.0, 3.0, 0))
    with pytest.raises(gr.Error, match="top_k"):
        list(text_only("piano", None, 0.5, 0, 0.0, 1.0, 3.0, 0))


@pytest.mark.slow
def test_the_page_in_a_headless_browser(app, tiny_melody_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("the browser test needs a system Chromium (apt-get install chromium)")
    from hum import synth_hum

    from musicgen_lite.audio_io import loudness, true_peak

    hum = tmp_path / "hum.wav"
    sf.write(hum, synth_hum([60, 62, 64, 67]), 32000)
    page_app = app.build_app(str(tiny_melody_dir))
    url = app.launch(page_app, "127.0.0.1", None, block=False)
    started = time.monotonic()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url, timeout=WAIT_MS)
            page.fill("#text textarea", "a folk tune on a fiddle")
            page.fill("#duration input[type=number]", "1")
            page.press("#duration input[type=number]", "Tab")
            page.fill("#seed input", "3")
            page.set_input_files("#melody input[type=file]", str(hum))
            page.wait_for_selector("#melody audio", state="attached", timeout=WAIT_MS)  # the upload finished
            page.click("#generate")

            player = page.wait_for_selector("#result audio[src]", state="attached", timeout=WAIT_MS)  # the player has a source
            page.wait_for_selector("#plot img", timeout=WAIT_MS)
            page.wait_for_function("e => e.duration > 0", arg=player, timeout=WAIT_MS)
            assert player.evaluate("e => e.duration") == pytest.approx(1.0, abs=0.01)
            wav = page.request.get(page.get_attribute("#result a[download]", "href")).body()
            audio, rate = sf.read(io.BytesIO(wav), always_2d=True)
            assert rate == 32000 and audio.shape[0] == 32000  # 1 s, as set on the page
            level, peak_db = loudness(audio.T, rate), 20 * np.log10(true_peak(audio.T))
            assert abs(level + 14.0) < 0.1 or (level < -14.0 and abs(peak_db + 1.0) < 0.05)
            png = page.request.get(page.eval_on_selector("#plot img", "e => e.src")).body()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

            page.fill("#text textarea", "")
            page.click("#generate")
            toast = page.wait_for_selector("[data-testid=toast-text]", timeout=WAIT_MS)
            assert toast.inner_text().strip() == "text is empty"
            browser.close()
    finally:
        page_app.close()
    assert time.monotonic() - started < 60


def test_the_page_streams_the_audio_then_shows_the_normalised_result(app, tiny_musicgen_dir):
    """The live player gets WAV chunks while generating; the last update is the result and its picture."""
    page = app.Generator(str(tiny_musicgen_dir))  # holds the directory the files are served from
    updates = list(page("piano", None, 1.0, 250, 0.0, 1.0, 3.0, 5))
    *live, (skipped, result, picture) = updates
    assert len(live) >= 2 and isinstance(skipped, type(gr.skip()))
    chunks = [sf.read(io.BytesIO(wav), dtype="float32")[0] for wav, _, _ in live]
    streamed = np.concatenate(chunks)
    final, rate = sf.read(result, dtype="float32")
    assert rate == 32000 and streamed.shape == final.shape == (32000,)
    assert Path(picture).suffix == ".png"
    assert np.corrcoef(streamed, final)[0, 1] > 0.999  # the same audio, only its level normalised


def test_the_sampling_controls_start_at_the_models_defaults(app, tiny_musicgen_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_musicgen_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**config, "top_k": 40, "temperature": 0.7}))
    defaults = app.sampling_defaults(str(tmp_path / "m"))
    assert (defaults.top_k, defaults.temperature, defaults.cfg_coef) == (40, 0.7, 3.0)
    assert app.sampling_defaults(str(tmp_path / "missing")).top_k == 250
