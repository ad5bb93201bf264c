import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples" / "manifest.jsonl"
TINY_RECIPES = REPO / "recipes" / "tiny"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in assets (`model.pretrained: tiny`) go to a per-session cache, never the user's home."""
    os.environ["COSMOS_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("cosmos_train_cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from cosmos_train.models.tiny import make_tiny

    return Path(make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-cosmos3"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from diffusers import Cosmos3OmniPipeline

    return Cosmos3OmniPipeline.from_pretrained(str(tiny_dir))
