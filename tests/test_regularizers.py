import json
import math
import textwrap

import pytest
import torch

import regcollect as rc
from regcollect import regularizers

X = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.5]], dtype=torch.float64)
ABS_SUM = 1 + 2 + 0.5 + 0 + 3 + 1.5  # 8.0
SQ_SUM = 1 + 4 + 0.25 + 0 + 9 + 2.25  # 16.5


@pytest.mark.parametrize(
    ("reg", "expected"),
    [
        (rc.L1(0.1), 0.1 * ABS_SUM),
        (rc.L2(0.1), 0.1 * SQ_SUM),
        (rc.L1L2(l1=0.1, l2=0.2), 0.1 * ABS_SUM + 0.2 * SQ_SUM),
        (rc.L1L2(l1=0.3), 0.3 * ABS_SUM),
        (rc.L1L2(), 0.0),
        (rc.l1(), 0.01 * ABS_SUM),
        (rc.l2(), 0.01 * SQ_SUM),
        (rc.l1_l2(), 0.01 * ABS_SUM + 0.01 * SQ_SUM),
        (rc.L1(), 0.01 * ABS_SUM),
        (rc.L2(), 0.01 * SQ_SUM),
    ],
)
def test_formulas(reg, expected, device):
    value = reg(X.to(device))
    assert value.shape == () and value.device == device
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_defaults_match_keras():
    assert rc.L1().get_config() == {"l1": 0.01}
    assert rc.L2().get_config() == {"l2": 0.01}
    assert rc.L1L2().get_config() == {"l1": 0.0, "l2": 0.0}
    assert rc.l1_l2().get_config() == {"l1": 0.01, "l2": 0.01}
    assert rc.Orthogonal().get_config() == {"factor": 0.01, "mode": "rows"}
    assert rc.OrthogonalRegularizer is rc.Orthogonal


def test_orthogonal_hand_computed(device):
    equal_rows = torch.tensor([[1.0, 0.0], [2.0, 0.0]], device=device)
    assert rc.Orthogonal(1.0)(equal_rows).item() == pytest.approx(1.0)
    orthogonal_rows = torch.tensor([[3.0, 4.0], [4.0, -3.0]], device=device)
    assert rc.Orthogonal(1.0)(orthogonal_rows).item() == pytest.approx(0.0, abs=1e-7)
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], device=device)
    # dots: 0, 1/sqrt2, 1/sqrt2; off-diagonal |P| sums to 2*sqrt2; 3 pairs.
    assert rc.Orthogonal(0.5)(three).item() == pytest.approx(0.5 * 0.5 * 2 * math.sqrt(2) / 3)
    # columns mode is rows mode on the transpose
    w = torch.randn(4, 6, device=device)
    assert torch.allclose(rc.Orthogonal(1.0, "columns")(w), rc.Orthogonal(1.0)(w.t()))


def test_orthogonal_rank_and_degenerate_cases():
    w = torch.randn(4, 3, 2, 2)
    assert torch.allclose(rc.Orthogonal(1.0)(w), rc.Orthogonal(1.0)(w.reshape(4, -1)))
    one_row = torch.randn(1, 5, requires_grad=True)
    value = rc.Orthogonal(1.0)(one_row)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(one_row.grad).all()
    one_col = torch.randn(5, 1)
    assert rc.Orthogonal(1.0, mode="columns")(one_col).item() == 0.0
    with pytest.raises(ValueError, match=r"rank >= 2.*\(5,\)"):
        rc.Orthogonal()(torch.randn(5))


@pytest.mark.parametrize(
    "reg",
    [rc.L1(0.3), rc.L2(0.3), rc.L1L2(0.2, 0.4), rc.Orthogonal(0.7), rc.Orthogonal(0.7, "columns")],
    ids=repr,
)
def test_gradcheck(reg, device):
    # Keep away from |x| = 0 where L1 is not differentiable.
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    x = ((torch.rand(3, 4, dtype=torch.float64) + 0.1) * signs).to(device)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(reg, (x,))


def test_l2_gradient_matches_weight_decay_scaling():
    x = torch.randn(5, requires_grad=True)
    rc.L2(0.25)(x).backward()
    assert torch.allclose(x.grad, 0.5 * x.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_never_overflows(dtype, device):
    x = torch.full((100, 100), 300.0, dtype=dtype, device=device)  # 300**2 * 1e4 > fp16 max
    for reg, expected in [(rc.L2(1.0), 300.0**2 * 1e4), (rc.L1(1.0), 300.0 * 1e4)]:
        value = reg(x)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(expected, rel=1e-3)
    assert rc.Orthogonal(1.0)(x).dtype == torch.float32


def test_output_dtype_and_device(device):
    assert rc.L2()(torch.ones(3, device=device)).dtype == torch.float32
    assert rc.L2()(torch.ones(3, dtype=torch.float64, device=device)).dtype == torch.float64
    assert rc.L1()(torch.ones(3, dtype=torch.int64, device=device)).dtype == torch.float32
    for reg in (rc.L2(), rc.L1(), rc.L1L2(0.1, 0.1), rc.Orthogonal()):
        assert reg(torch.ones(3, 3, device=device)).device == device


BAD_COEFFICIENTS = [-0.1, float("nan"), float("inf"), -float("inf"), True, False, "0.1", None, [1]]


@pytest.mark.parametrize("bad", BAD_COEFFICIENTS, ids=repr)
@pytest.mark.parametrize(
    ("factory", "argument"),
    [(rc.L1, "l1"), (rc.L2, "l2"), (rc.l1, "l1"), (rc.l2, "l2"), (rc.Orthogonal, "factor")],
)
def test_bad_coefficients(factory, argument, bad):
    with pytest.raises(ValueError, match=argument) as info:
        factory(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", BAD_COEFFICIENTS, ids=repr)
def test_bad_l1l2_coefficients(bad):
    with pytest.raises(ValueError, match="l2"):
        rc.L1L2(l1=0.1, l2=bad)
    with pytest.raises(ValueError, match="l1"):
        rc.l1_l2(l1=bad)


def test_good_coefficients_accept_ints_and_numpy():
    import numpy as np

    assert rc.L2(0).l2 == 0.0
    assert rc.L2(3).l2 == 3.0
    assert rc.L2(np.float32(0.5)).l2 == 0.5


def test_bad_mode():
    with pytest.raises(
        ValueError, match=r'mode must be "rows" or "columns" \(Keras\'s names\) or "outputs" or'
    ):
        rc.Orthogonal(mode="diagonal")


def test_get():
    reg = rc.L2(0.3)
    assert regularizers.get(None) is None
    assert regularizers.get(reg) is reg
    assert regularizers.get("l1") == rc.L1(0.01)
    assert regularizers.get("l2") == rc.L2(0.01)
    assert regularizers.get("l1_l2") == rc.L1L2(0.01, 0.01)
    assert regularizers.get("l1l2") == rc.L1L2(0.01, 0.01)
    assert regularizers.get("orthogonal") == rc.Orthogonal()
    assert regularizers.get("orthogonal_regularizer") == rc.Orthogonal()
    assert regularizers.get("L1L2") == rc.L1L2()
    assert regularizers.get("OrthogonalRegularizer") == rc.Orthogonal()
    assert regularizers.get(rc.L1) == rc.L1()
    assert regularizers.get({"class_name": "L2", "config": {"l2": 0.5}}) == rc.L2(0.5)


def test_get_custom_callable():
    reg = regularizers.get(lambda x: 2.0 * x.sum())
    assert isinstance(reg, rc.Regularizer)
    assert reg(torch.ones(3)).item() == 6.0
    with pytest.raises(TypeError, match="must return a torch.Tensor, got float"):
        regularizers.get(lambda x: 1.0)(torch.ones(3))
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(3,\)"):
        regularizers.get(lambda x: x)(torch.ones(3))


@pytest.mark.parametrize("bad", ["l3", "L2 ", 0.01, 1, object(), torch.nn.Linear(1, 1), int])
def test_get_rejects(bad):
    with pytest.raises(ValueError, match="l1_l2") as info:
        regularizers.get(bad)
    assert "expected" in str(info.value)


@pytest.mark.parametrize(
    "reg", [rc.L1(0.2), rc.L2(0.3), rc.L1L2(0.1, 0.2), rc.Orthogonal(0.5, "columns")], ids=repr
)
def test_serialize_round_trip(reg):
    config = rc.serialize(reg)
    assert set(config) == {"class_name", "config"}
    restored = rc.deserialize(json.loads(json.dumps(config)))
    assert type(restored) is type(reg)
    assert restored.get_config() == reg.get_config()
    assert torch.equal(restored(X), reg(X))


def test_register_custom_regularizer():
    @rc.register("TestMaxAbs")
    class MaxAbs(rc.Regularizer):
        def __init__(self, c=1.0):
            self.c = regularizers.check_coefficient("c", c)

        def __call__(self, x):
            return self.c * x.abs().max().float()

        def get_config(self):
            return {"c": self.c}

    config = rc.serialize(MaxAbs(2.0))
    assert config == {"class_name": "TestMaxAbs", "config": {"c": 2.0}}
    assert rc.deserialize(config)(X).item() == pytest.approx(6.0)
    assert regularizers.get("TestMaxAbs") == MaxAbs()
    with pytest.raises(ValueError, match="already registered"):
        rc.register("TestMaxAbs")(type("Other", (rc.Regularizer,), {}))


def test_a_notebook_cell_run_again_registers_its_new_class():
    """Running a cell (or reloading a module) defines the class again: the name moves to the
    new definition, as Keras's register_keras_serializable does; another class is refused."""
    cell = textwrap.dedent(
        """
        import regcollect as rc

        @rc.register("TestCellMaxAbs")
        class MaxAbs(rc.Regularizer):
            def __init__(self, c=1.0):
                self.c = c

            def __call__(self, x):
                return SCALE * self.c * x.abs().max()

            def get_config(self):
                return {"c": self.c}
        """
    )
    first, second = {"__name__": "__main__", "SCALE": 1.0}, {"__name__": "__main__", "SCALE": 10.0}
    exec(cell, first)
    exec(cell, second)  # the same cell run again, after an edit
    config = rc.serialize(first["MaxAbs"](2.0))
    assert rc.deserialize(config)(X).item() == pytest.approx(60.0)  # the new definition
    with pytest.raises(
        ValueError, match=r"already registered as 'TestCellMaxAbs'.*__main__\.MaxAbs"
    ):
        rc.register("TestCellMaxAbs")(type("MaxAbs", (rc.Regularizer,), {"__module__": "other"}))
    with pytest.raises(ValueError, match="already registered as 'L2'"):
        rc.register("L2")(type("L2", (rc.Regularizer,), {"__module__": "__main__"}))


def test_register_without_a_name_says_how_to_decorate():
    with pytest.raises(
        ValueError, match=r'got <class .*Bare.*> \(decorate with @rc.register\("Name"\)'
    ):

        @rc.register  # type: ignore[arg-type]
        class Bare(rc.Regularizer):
            pass


def test_deserialize_of_a_name_points_to_get():
    with pytest.raises(TypeError, match=r"got str 'l2'; for a name, rc\.regularizers\.get\('l2'\)"):
        rc.deserialize("l2")  # type: ignore[arg-type]
    assert regularizers.get("l2") == rc.l2()


def test_serialize_unregistered_fails_clearly():
    class Unregistered(rc.Regularizer):
        def get_config(self):
            return {}

    with pytest.raises(ValueError, match="not registered"):
        rc.serialize(Unregistered())
    with pytest.raises(TypeError, match="expects a Regularizer"):
        rc.serialize("l2")


@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "os.system", "config": {}},
        {"class_name": "builtins.eval", "config": {"source": "1"}},
        {"module": "os", "class_name": "system", "config": {"command": "true"}},
        {"class_name": "L2", "config": {"l2": 0.1}, "__reduce__": "x"},
        {"class_name": "L2", "config": {"l3": 0.1}},
        {"class_name": "L2", "config": "l2=0.1"},
        {"config": {}},
    ],
)
def test_deserialize_only_resolves_registered_names(config):
    import sys

    before = set(sys.modules)
    with pytest.raises(ValueError):
        rc.deserialize(config)
    assert set(sys.modules) == before


def test_orthogonal_under_autocast_stays_in_float32(device):
    # Autocast ran the Gram matrix in bfloat16: 1.6e-4 relative off a float64 reference.
    w = torch.randn(64, 64, device=device)
    want = rc.Orthogonal(1.0)(w.double()).item()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = rc.Orthogonal(1.0)(w)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-6)
