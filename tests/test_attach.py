import gc
import tracemalloc
import weakref

import pytest
import torch

import regcollect as rc


class RMSNorm(torch.nn.Module):  # a custom norm, as LLaMA-style code defines it
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Scale(torch.nn.Module):  # a custom layer with a kernel: not a whitelisted class
    def __init__(self):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(8, 8))
        self.gain = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return (x @ self.kernel) * self.gain


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.rms = RMSNorm(8)
        self.custom = Scale()
        self.head = torch.nn.Linear(8, 3)
        self.pos = torch.nn.Parameter(torch.zeros(1, 5, 8))

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos
        x = self.gn(self.bn(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        return self.head(self.custom(self.rms(self.ln(x)))).mean(1)


ALL = dict(kernel=rc.l2(1.0), bias=rc.l1(2.0), norm=rc.l2(3.0), embeddings=rc.l1(4.0))


def assignment(handle):
    return {e.name: e.regularizer for e in handle.entries}


def test_default_rules():
    net = Net()
    got = assignment(rc.regularize(net, **ALL))
    assert got == {
        "emb.weight": ALL["embeddings"],
        "conv.weight": ALL["kernel"],
        "conv.bias": ALL["bias"],
        "bn.weight": ALL["norm"],
        "bn.bias": ALL["norm"],
        "gn.weight": ALL["norm"],
        "gn.bias": ALL["norm"],
        "ln.weight": ALL["norm"],
        "ln.bias": ALL["norm"],
        "rms.weight": ALL["norm"],
        "custom.kernel": ALL["kernel"],
        "head.weight": ALL["kernel"],
        "head.bias": ALL["bias"],
    }  # no "pos" (no_weight_decay) and no "custom.gain" (a vector that is no bias)
    params = dict(net.named_parameters())
    expected = sum((reg(params[name]) for name, reg in got.items()), torch.zeros(()))
    assert rc.loss().item() == pytest.approx(expected.item(), rel=1e-5)


def test_only_kernel():
    net = Net()
    got = assignment(rc.regularize(net, kernel=rc.l2(1e-4)))
    assert set(got) == {"conv.weight", "custom.kernel", "head.weight"}


def test_include_exclude():
    net = Net()
    got = assignment(
        rc.regularize(net, kernel="l2", bias="l2", include=["head.*", "conv.*"], exclude=["*.bias"])
    )
    assert set(got) == {"head.weight", "conv.weight"}
    with pytest.raises(TypeError, match=r"include must be a list of glob patterns.*'head\.\*'"):
        rc.regularize(net, kernel="l2", include="head.*")
    with pytest.raises(TypeError, match="exclude must contain strings"):
        rc.regularize(net, kernel="l2", exclude=[3])
    with pytest.raises(ValueError, match="unknown regularizer"):
        rc.regularize(net, kernel="l9")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        rc.regularize("net", kernel="l2")


def test_wrappers_never_appear_in_names():
    net = Net()
    wrapped = torch.nn.DataParallel(net)  # holds the model as .module, like DDP (CPU: no-op)
    got = assignment(rc.regularize(wrapped, kernel="l2", exclude=["conv.*"]))
    assert set(got) == {"custom.kernel", "head.weight"}
    rc.get_collection().clear()
    compiled = torch.compile(Net())
    got = assignment(rc.regularize(compiled, kernel="l2", include=["head.weight"]))
    assert set(got) == {"head.weight"}


def test_parametrized_weight_regularizes_the_optimized_tensor():
    from torch.nn.utils.parametrizations import weight_norm

    layer = weight_norm(torch.nn.Linear(4, 4))
    model = torch.nn.Sequential(layer)
    got = assignment(rc.regularize(model, kernel=rc.l2(1.0), include=["0.weight"]))
    assert set(got) == {
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
    }
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert rc.loss().item() == pytest.approx(((g**2).sum() + (v**2).sum()).item(), rel=1e-5)
    rc.loss().backward()
    assert torch.allclose(v.grad, 2 * v.detach())


def test_rerun_never_double_counts_and_handle_restores_what_it_replaced():
    net = Net()
    handles = [rc.regularize(net, kernel=rc.l2(c)) for c in (1.0, 2.0, 3.0)]
    assert len(rc.get_collection()) == 3
    assert [e.regularizer for e in rc.get_collection().entries()] == [rc.l2(3.0)] * 3
    other = rc.regularize(net, bias=rc.l1(1.0))
    assert len(rc.get_collection()) == 5
    handles[2].remove()  # the state before that call: the second call's kernels
    kernels = [e for e in rc.get_collection().entries() if not e.name.endswith("bias")]
    assert [e.regularizer for e in kernels] == [rc.l2(2.0)] * 3
    handles[1].remove()
    handles[0].remove()
    assert {e.name for e in rc.get_collection().entries()} == {"conv.bias", "head.bias"}
    with rc.regularize(net, embeddings="l2"):
        assert len(rc.get_collection()) == 3
    assert len(rc.get_collection()) == 2
    other.remove()
    assert len(rc.get_collection()) == 0


def test_tied_embedding_and_head_count_once():
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    lm = LM()
    handle = rc.regularize(lm, kernel=rc.l2(1.0), embeddings=rc.l2(1.0))
    assert len(handle.entries) == 1
    assert rc.loss().item() == pytest.approx((lm.emb.weight**2).sum().item(), rel=1e-5)


def test_frozen_then_unfrozen():
    net = Net()
    rc.regularize(net, kernel=rc.l2(1.0))
    net.requires_grad_(False)
    assert rc.loss().item() == 0.0
    net.head.requires_grad_(True)
    assert rc.loss().item() == pytest.approx((net.head.weight**2).sum().item(), rel=1e-5)


def test_activity_on_model_and_included_modules():
    net = Net()
    rc.regularize(net, activity=rc.l2(1.0))
    tokens = torch.randint(0, 10, (4, 5))
    out = net(tokens)
    assert rc.loss().item() == pytest.approx(((out**2).sum() / 4).item(), rel=1e-5)
    rc.get_collection().clear()
    handle = rc.regularize(net, activity=rc.l1(1.0), include=["head", "ln"])
    assert {e.name for e in handle.entries} == {"head:activity", "ln:activity"}


def test_activity_counting_shared_layer_and_batch_sizes():
    shared = rc.nn.Linear(3, 3, bias=False, activity_regularizer=rc.l1(1.0))
    with torch.no_grad():
        shared.weight.copy_(torch.eye(3))
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    x = torch.ones(2, 3)
    model(x)  # shared called twice in one pass: 2 penalties of sum(|out|)/batch = 6/2 = 3
    assert rc.loss().item() == pytest.approx(6.0)
    shared(torch.ones(5, 3))  # a pass of the layer alone, batch 5: 15/5 = 3, replacing both
    assert rc.loss().item() == pytest.approx(3.0)
    with torch.no_grad():
        shared(torch.ones(7, 3))  # no gradients: records nothing, replaces nothing
    shared(2 * torch.ones(1, 3))  # batch 1: 6/1 = 6
    assert rc.loss().item() == pytest.approx(6.0)
    assert rc.loss().item() == pytest.approx(6.0)  # a second read: the same, no side effect


def test_forward_passes_never_read_keep_only_the_latest_alive():
    """1200 forward passes with gradients on and no loss() (an inference loop with no_grad
    forgotten): each pass replaces the last, so memory stays flat and the earlier graphs
    are freed; the latest pass still reads."""
    coll = rc.Collection()
    layer = rc.nn.Linear(256, 256, activity_regularizer=rc.l2(1e-3), collection=coll)
    x = torch.randn(32, 256)
    first_outputs = []
    tracemalloc.start()
    for step in range(1200):
        out = layer(x)
        if step < 5:
            first_outputs.append(weakref.ref(out))
        if step == 200:
            gc.collect()
            mid, _ = tracemalloc.get_traced_memory()
        del out
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(r() is None for r in first_outputs)  # early graphs were released
    assert end - mid < 1_000_000  # flat between step 200 and 1200 (bytes)
    out = layer(x)
    assert coll.loss().item() == pytest.approx(1e-3 * (out**2).sum().item() / 32, rel=1e-6)


def test_set_up_code_run_twice_then_removed_leaves_nothing_and_an_override_still_restores():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 3), rc.nn.Linear(3, 2, kernel_regularizer=rc.l1(0.5))
    )
    w1 = model[1].weight.detach()
    handle = rc.regularize(model, kernel=rc.l2(0.1))  # a notebook cell ...
    handle = rc.regularize(model, kernel=rc.l2(0.1))  # ... run twice
    assert rc.loss().item() == pytest.approx(
        0.1 * ((model[0].weight ** 2).sum() + (w1**2).sum()).item(), rel=1e-6
    )
    handle.remove()
    # Nothing of the cell is left; the layer's own regularizer is back.
    assert rc.loss().item() == pytest.approx(0.5 * w1.abs().sum().item(), rel=1e-6)
    with rc.regularize(model, kernel=rc.l2(0.3)):  # a temporary override
        assert rc.loss().item() == pytest.approx(
            0.3 * ((model[0].weight ** 2).sum() + (w1**2).sum()).item(), rel=1e-6
        )
    assert rc.loss().item() == pytest.approx(0.5 * w1.abs().sum().item(), rel=1e-6)
