"""Fixtures of the inference tests: the perturbed tiny model, its saved folder (with the tiny tokenizer) and
transformers' KimiLinearForCausalLM loaded from that folder."""

from __future__ import annotations

import shutil

import pytest
import torch
from infer_helpers import TOKENIZER, perturbed_tiny_model

from kimitune import KimiLinearForCausalLM


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every inference test runs tiny models (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_model() -> KimiLinearForCausalLM:
    return perturbed_tiny_model()


@pytest.fixture(scope="session")
def tiny_folder(tiny_model, tmp_path_factory):
    """The tiny model in the release layout (several shards) with the tiny tokenizer's files beside it."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(folder, max_shard_size="1MB")
    for file in TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    from kimitune.data import load_tokenizer

    return load_tokenizer(str(TOKENIZER))


@pytest.fixture(scope="session")
def hf_tiny(tiny_folder):
    """transformers' own model on the same weights (float32, eager attention)."""
    transformers = pytest.importorskip("transformers")
    return transformers.KimiLinearForCausalLM.from_pretrained(
        tiny_folder, attn_implementation="eager", dtype=torch.float32
    ).eval()
