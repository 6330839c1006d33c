import gc

import pytest
import torch

import regcollect as rc


@pytest.fixture(autouse=True)
def fresh_default_collection():
    """Every test starts with an empty default collection and deterministic weights."""
    rc.get_collection().clear()
    torch.manual_seed(0)
    yield
    rc.get_collection().clear()
    gc.collect()
