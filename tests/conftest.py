"""Shared fixtures of the text-to-image tests: tiny random pipelines (tests/tiny_pipelines.py) and training data."""

import pytest
from tiny_pipelines import tiny_sd3, tiny_sd15, tiny_sdxl, write_image_folder


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd15": str(tiny_sd15(root / "sd15")), "sdxl": str(tiny_sdxl(root / "sdxl")),
            "sd3": str(tiny_sd3(root / "sd3"))}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "prompts.txt").write_text("a cat\nthe dog and a cat\nred car\nblue sky\n")
    return {"prompts": str(root / "prompts.txt"), "real": str(write_image_folder(root / "real", 6))}
