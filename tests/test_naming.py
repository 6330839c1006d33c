"""_naming: where a module sits, and when cached names must be recomputed."""

import copy
import re

import pytest
import torch

import regcollect as rc
from regcollect import _naming


def test_path_to_root_follows_the_outermost_model():
    inner = torch.nn.Linear(2, 2)
    block = torch.nn.Sequential(torch.nn.ReLU(), inner)
    model = torch.nn.ModuleDict({"encoder": block})
    root, path = _naming.path_to_root(inner)
    assert root is model and path == "encoder.1"
    assert _naming.path_to_root(model) == (model, "")


def test_replaced_child_no_longer_resolves_to_its_old_path():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    old = model[0]
    model[0] = torch.nn.Linear(2, 2)
    assert _naming.path_to_root(old) == (old, "")


def test_unrelated_modules_leave_the_version_alone():
    model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer="l2"))
    version = _naming.version()
    torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())  # no entries anywhere inside
    assert _naming.version() == version
    torch.nn.Sequential(model)  # the model is wrapped: its entries' names change
    assert _naming.version() > version


def test_replacing_a_tracked_child_bumps_the_version():
    model = torch.nn.Sequential(rc.nn.Linear(2, 2, kernel_regularizer="l2"))
    version = _naming.version()
    model[0] = torch.nn.Identity()
    assert _naming.version() > version


def test_a_deep_copy_gets_its_names_once_scoped():
    model = torch.nn.Sequential(torch.nn.ReLU(), rc.nn.Linear(2, 2, kernel_regularizer="l2"))
    clone = copy.deepcopy(model)  # pickle-style copies carry no parent links
    rc.loss(clone)
    assert set(rc.penalties(clone)) == {"1.weight", "total"}


def test_wrapper_free_paths_and_auto_names():
    inner = torch.nn.Sequential(torch.nn.Linear(2, 2))
    paths = [p for p, _ in _naming.named_modules(torch.nn.DataParallel(inner))]
    assert paths == ["", "", "0"]  # the wrapper and the model share the empty path

    class MyBlock2D(torch.nn.Module):
        pass

    a, b = MyBlock2D(), MyBlock2D()
    assert (_naming.auto_name(a), _naming.auto_name(b)) == ("my_block2_d", "my_block2_d_1")
    assert _naming.auto_name(a) == "my_block2_d"  # stable


class HoldsAToken(torch.nn.Module):  # torchvision's ViT holds class_token itself
    def __init__(self):
        super().__init__()
        self.class_token = torch.nn.Parameter(torch.ones(1, 1, 4))
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x + self.class_token[0])


def test_a_parameter_the_model_holds_is_named_as_in_named_parameters():
    first, second = HoldsAToken(), HoldsAToken()
    for model in (first, second):
        rc.regularize(model, kernel=rc.l2(1.0))
    names = [e.name for e in rc.get_collection().entries()]
    # was 'holds_a_token.class_token' and 'holds_a_token_1.class_token'
    assert names[:2] == ["class_token", "head.weight"]
    rc.loss(first)
    rc.loss(second)
    assert (
        list(rc.penalties(first))
        == list(rc.penalties(second))
        == [
            "class_token",
            "head.weight",
            "total",
        ]
    )
    assert rc.penalties(first)["class_token"] == pytest.approx(4.0)
    compiled = torch.compile(first)  # the wrapper changes nothing
    rc.regularize(compiled, kernel=rc.l2(1.0))
    rc.loss(compiled)
    assert list(rc.penalties(compiled)) == ["class_token", "head.weight", "total"]
    lone = rc.nn.Linear(2, 2, kernel_regularizer="l2")  # a lone layer keeps Keras's naming
    entry = next(e for e in rc.get_collection().entries() if e.module is lone)
    # (automatic names count per process, as Keras's do: linear, linear_1, ...)
    assert re.fullmatch(r"entry 'linear(_\d+)?\.weight'", rc.get_collection().describe(entry))
