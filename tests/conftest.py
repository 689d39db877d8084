"""Shared pytest setup: offline Hugging Face access and the tiny MusicGen checkpoints.

HF_HUB_OFFLINE is set before anything imports huggingface_hub, which reads it once at import time:
the tests must never reach for the hub, and a missing local file should fail at once instead of
waiting on a network timeout.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny (32-wide): with several intra-op threads on a small, shared CPU every matmul
# pays thread hand-off costs (measured ~15x slower per op with 2 threads on a loaded 2-core machine).
# An explicit OMP_NUM_THREADS from the caller wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_musicgen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny text-to-music checkpoint laid out like facebook/musicgen-small (built once per session)."""
    # Imported here so that test modules which never use the checkpoints do not depend on tiny_models' imports.
    from tiny_models import build_tiny_musicgen

    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny_musicgen"))


@pytest.fixture(scope="session")
def tiny_melody_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny MusicGen-Melody checkpoint laid out like facebook/musicgen-melody (built once per session)."""
    from tiny_models import build_tiny_musicgen

    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny_melody"), melody=True)


@pytest.fixture(scope="session")
def tiny_default_like_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model in the project's own format, built like the bundled default model (prefix LM,
    chroma, T5 from captions), built once per session."""
    from tiny_models import build_tiny_default_like

    return build_tiny_default_like(tmp_path_factory.mktemp("tiny_default_like") / "model")

