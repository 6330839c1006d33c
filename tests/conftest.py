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


@pytest.fixture
def plan_builds(monkeypatch):
    """The plans loss() builds, in order: a plan reused between steps is not built again."""
    import regcollect.plans as plans

    built = []
    original = plans.Plan

    class Counting(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(plans, "Plan", Counting)
    return built
