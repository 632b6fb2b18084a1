"""ComfyUI for the tests in this folder: the `comfy` session fixture imports real ComfyUI (tests/comfyui/harness.py)
once, CPU only, and skips every test that uses it when ComfyUI is not installed here. In CI (`CI` set) a missing
ComfyUI fails instead: `make test` installs it, so a skip there would hide a broken install step."""

import os

import pytest

from tests.comfyui import harness


@pytest.fixture(scope="session")
def comfy():
    try:
        return harness.load_comfy()
    except harness.ComfyUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the ComfyUI tests: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def node_pack(comfy):
    """Our node pack, loaded the way ComfyUI loads a custom_nodes/ folder (nodes.load_custom_node)."""
    return harness.load_node_pack()
