"""Shared fixtures: tiny random-init pipelines of every supported family, built from configs.

The session-scoped pipelines are shared by many tests: treat them as read-only (tests that edit
weights build their own with ``build_tiny_pipeline``, which takes a fraction of a second).
"""

from __future__ import annotations

import os

# Tiny models gain nothing from several threads, and on a small shared machine OpenMP threads
# spinning against other jobs make each op ~100x slower; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd1():
    from conceptguard.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="session")
def tiny_sd2():
    from conceptguard.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd2")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from conceptguard.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tiny_sd1, tmp_path_factory):
    """``tiny_sd1`` saved as a diffusers pipeline folder (safetensors)."""
    folder = tmp_path_factory.mktemp("tiny_sd1") / "pipeline"
    tiny_sd1.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; a test that trains gets a clean one (use it with
    ``pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")``)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def pytest_collection_modifyitems(config, items):
    """World-effect tests measure the trained embedded world; without its weights they cannot run."""
    from conceptguard.world import ASSETS_DIR

    if (ASSETS_DIR / "manifest.json").is_file():
        return
    skip = pytest.mark.skip(reason=f"the embedded world's weights are not installed in {ASSETS_DIR}")
    for item in items:
        if "world" in item.keywords:
            item.add_marker(skip)
