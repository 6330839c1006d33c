"""L2SP and GroupLasso: formulas, the engine's grouped evaluation, references on modules,
checkpoint resume, and the optimizer-step mode."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import regcollect as rc
from regcollect._torch_compat import COMPILED_LOSS_WITHOUT_GRAPH_BREAKS


def net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )


def perturb(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- L2SP ---------------------------------------------------------------------------------


def test_l2sp_direct_value_and_gradient_equal_the_formula():
    x0 = torch.randn(5, 7, dtype=torch.float64)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    reg = rc.L2SP(0.3, reference=x0)
    value = reg(x)
    assert value.item() == pytest.approx(0.3 * ((x - x0) ** 2).sum().item(), rel=1e-12)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(grad, 0.6 * (x - x0).detach())
    assert torch.autograd.gradcheck(reg, (x,))


def test_l2sp_in_the_engine_equals_the_formula_with_one_grouped_node(device):
    model = net().to(device)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.L2SP(0.02), collection=coll)
    perturb(model)
    total = coll.loss()
    # Three kernels of one coefficient: one node, whose inputs are every kernel.
    assert type(total.grad_fn).__name__ == "_DifferencePenaltyBackward"
    kernels = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    expected = {
        n: 0.02 * ((p.detach().double() - reference[n].double()) ** 2).sum().item()
        for n, p in kernels.items()
    }
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-6)
    assert coll.penalties() == pytest.approx({**expected, "total": total.item()}, rel=1e-6)
    total.backward()
    for n, p in kernels.items():
        torch.testing.assert_close(p.grad, 0.04 * (p.detach() - reference[n]))


def test_l2sp_engine_gradcheck_float64():
    layers = torch.nn.ModuleList([torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)]).double()
    coll = rc.Collection()
    for layer in layers:
        rc.add_regularizer(layer, "weight", rc.L2SP(0.7), collection=coll)
    perturb(layers)
    weights = [layer.weight for layer in layers]

    def penalty(*ws):
        for layer, w in zip(layers, ws):
            layer._parameters["weight"] = w
        return coll.loss()

    inputs = tuple(w.detach().clone().requires_grad_() for w in weights)
    assert torch.autograd.gradcheck(penalty, inputs)


def test_l2sp_starts_at_zero_and_its_reference_is_a_state_dict_buffer():
    model = net()
    handle = rc.regularize(model, kernel=rc.L2SP(0.1))
    assert rc.loss().item() == 0.0
    keys = list(model.state_dict())
    assert "0.weight_l2sp_reference" in keys and "5.weight_l2sp_reference" in keys
    assert "0.bias_l2sp_reference" not in keys
    torch.testing.assert_close(model.state_dict()["0.weight_l2sp_reference"], model[0].weight)
    handle.remove()
    assert not any(k.endswith("_l2sp_reference") for k in model.state_dict())
    assert list(model.state_dict()) == list(net().state_dict())


def test_l2sp_checkpoint_resume_keeps_the_original_reference():
    torch.manual_seed(0)
    pretrained = net()
    original = copy.deepcopy(pretrained.state_dict())
    rc.regularize(pretrained, kernel=rc.L2SP(0.1))
    opt = torch.optim.SGD(pretrained.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 5, 5), torch.randn(4, 4)
    for _ in range(3):
        opt.zero_grad()
        (torch.nn.functional.mse_loss(pretrained(x), y) + rc.loss()).backward()
        opt.step()
    before = rc.loss().item()
    assert before > 0
    buffer = io.BytesIO()
    torch.save(pretrained.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    rc.get_collection().clear()

    # The resume script: a fresh model regularized first, then the checkpoint loaded.
    resumed = net()
    coll = rc.Collection()
    rc.regularize(resumed, kernel=rc.L2SP(0.1), collection=coll)
    resumed.load_state_dict(checkpoint)
    torch.testing.assert_close(resumed[0].weight_l2sp_reference, original["0.weight"])
    assert not torch.equal(resumed[0].weight, original["0.weight"])  # it did train
    assert coll.loss().item() == pytest.approx(before, rel=1e-6)


def test_loading_a_plain_pretrained_checkpoint_makes_it_the_reference():
    pretrained = net().state_dict()
    model = net()  # other random weights
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.L2SP(0.1), collection=coll)
    model.load_state_dict(pretrained)  # strict: the missing reference keys are filled in
    torch.testing.assert_close(model[2].weight_l2sp_reference, pretrained["2.weight"])
    assert coll.loss().item() == 0.0


def test_registering_again_keeps_the_reference_and_an_explicit_one_replaces_it():
    layer = torch.nn.Linear(3, 2)
    w0 = layer.weight.detach().clone()
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.L2SP(0.5), collection=coll)
    perturb(layer)
    rc.add_regularizer(layer, "weight", rc.L2SP(0.5), collection=coll)  # set-up re-run
    torch.testing.assert_close(layer.weight_l2sp_reference, w0)
    target = torch.ones(2, 3)
    rc.add_regularizer(layer, "weight", rc.L2SP(0.5, reference=target), collection=coll)
    assert coll.loss().item() == pytest.approx(0.5 * ((layer.weight - 1) ** 2).sum().item())
    # Replaced by another penalty: the buffer stays, for when the replacement is removed.
    handle = rc.add_regularizer(layer, "weight", rc.l2(0.5), collection=coll)
    assert "weight_l2sp_reference" in layer.state_dict()
    handle.remove()  # L2-SP is back, towards the same explicit target
    assert coll.loss().item() == pytest.approx(0.5 * ((layer.weight - 1) ** 2).sum().item())


def test_l2sp_reference_from_a_state_dict_by_name():
    pretrained = net()
    saved = {"module." + k: v.clone() for k, v in pretrained.state_dict().items()}  # from DDP
    model = net()
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.L2SP(0.25, reference=saved), collection=coll)
    expected = sum(
        0.25 * ((p.detach() - saved["module." + n]) ** 2).sum().item()
        for n, p in model.named_parameters()
        if p.dim() >= 2
    )
    assert coll.loss().item() == pytest.approx(expected, rel=1e-6)


def test_l2sp_state_dict_without_a_parameter_names_it():
    pretrained = {k: v for k, v in net().state_dict().items() if not k.startswith("5.")}
    model = net()
    with pytest.raises(ValueError, match=r"no tensor for \['5.weight'\].*exclude="):
        rc.regularize(model, kernel=rc.L2SP(0.1, reference=pretrained))
    assert len(rc.get_collection()) == 0  # nothing registered
    handle = rc.regularize(model, kernel=rc.L2SP(0.1, reference=pretrained), exclude=["5.*"])
    assert [e.name for e in handle.entries] == ["0.weight", "2.weight"]


def test_l2sp_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="needs reference="):
        rc.L2SP(0.1)(torch.ones(2))
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(2,\)"):
        rc.L2SP(0.1, reference=torch.ones(3))(torch.ones(2))
    with pytest.raises(TypeError, match="reference must be a tensor"):
        rc.L2SP(0.1, reference=[1.0, 2.0])
    with pytest.raises(ValueError, match="l2 must be a non-negative"):
        rc.L2SP(-1.0)
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"shape \(3, 3\), expected the parameter's shape"):
        rc.add_regularizer(layer, "weight", rc.L2SP(0.1, reference=torch.ones(3, 3)))
    assert len(rc.get_collection()) == 0


def test_l2sp_serialises_like_the_others():
    reg = rc.L2SP(0.125, reference=torch.ones(2))
    assert rc.serialize(reg) == {"class_name": "L2SP", "config": {"l2": 0.125}}
    assert rc.deserialize(rc.serialize(reg)) == rc.L2SP(0.125)
    assert rc.regularizers.get("l2sp") == rc.L2SP(0.01)
    assert rc.regularizers.get("group_lasso") == rc.GroupLasso(0.01, axis=0)


def test_l2sp_follows_model_to_and_half_precision():
    model = net()
    coll = rc.Collection()
    rc.regularize(model, kernel=rc.L2SP(0.1), collection=coll)
    perturb(model)
    expected = coll.loss().item()
    model.double()
    assert model[0].weight_l2sp_reference.dtype == torch.float64
    assert coll.loss().item() == pytest.approx(expected, rel=1e-6)
    model.bfloat16()
    value = coll.loss()
    assert value.dtype == torch.float32
    reference = sum(
        0.1 * ((m.weight.double() - m.weight_l2sp_reference.double()) ** 2).sum().item()
        for m in (model[0], model[2], model[5])
    )
    assert value.item() == pytest.approx(reference, rel=1e-5)


def test_l2sp_on_an_rc_nn_layer_and_under_compile():
    layer = rc.nn.Linear(4, 3, kernel_regularizer=rc.L2SP(0.5))
    perturb(layer)
    eager = rc.loss()

    @torch.compile(backend="eager", fullgraph=COMPILED_LOSS_WITHOUT_GRAPH_BREAKS)
    def compiled():
        return rc.loss()

    torch.testing.assert_close(compiled(), eager)


# -- GroupLasso ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_group_lasso_direct_value_and_gradcheck(axis):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    reg = rc.GroupLasso(0.2, axis=axis)
    moved = x.detach().movedim(axis, 0)
    expected = 0.2 * sum(moved[g].norm().item() for g in range(moved.shape[0]))
    assert reg(x).item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(reg, (x,))


def test_group_lasso_on_tensors_of_one_shape_gives_each_its_own_value_and_gradient(device):
    layers = torch.nn.ModuleList([torch.nn.Conv2d(4, 6, 3) for _ in range(3)]).to(device)
    coll = rc.Collection()
    for i in range(len(layers)):
        # given the model (it may be built before regcollect's first entry: concepts.md)
        rc.add_regularizer(layers, f"{i}.weight", rc.GroupLasso(0.05), collection=coll)
    with torch.no_grad():
        layers[1].weight[2].zero_()  # a zero group: subgradient 0, never NaN
    total = coll.loss()  # tensors of one shape, evaluated together
    expected = {
        f"{i}.weight": 0.05 * layer.weight.detach().double().flatten(1).norm(dim=1).sum().item()
        for i, layer in enumerate(layers)
    }
    expected["total"] = sum(expected.values())
    assert coll.penalties() == pytest.approx(expected, rel=1e-6)
    total.backward()
    for layer in layers:
        w = layer.weight.detach()
        norms = w.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(layer.weight.grad, 0.05 * w / norms)
    assert torch.equal(layers[1].weight.grad[2], torch.zeros_like(layers[1].weight.grad[2]))


def test_group_lasso_errors():
    with pytest.raises(ValueError, match="axis must be an int, got True"):
        rc.GroupLasso(0.1, axis=True)
    with pytest.raises(ValueError, match=r"axis=2 is out of range for a tensor of shape \(3, 4\)"):
        rc.GroupLasso(0.1, axis=2)(torch.ones(3, 4))
    layer = torch.nn.Linear(4, 3)
    coll = rc.Collection()
    # At registration, naming the parameter; nothing is registered.
    with pytest.raises(ValueError, match=r"'linear.*bias'.*axis=1 is out of range"):
        rc.add_regularizer(layer, "bias", rc.GroupLasso(0.1, axis=1), collection=coll)
    assert len(coll) == 0
    assert rc.GroupLasso(0.5)(torch.zeros(0, 3)).item() == 0.0


# -- in the optimizer step ----------------------------------------------------------------


def test_group_lasso_proximal_step_zeroes_whole_groups():
    layer = torch.nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0]).unsqueeze(1))
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.GroupLasso(0.5), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    before = layer.weight.detach().clone()
    loss = layer(torch.randn(3, 6)).pow(2).mean() + coll.loss()
    assert not coll.loss().requires_grad  # the step applies it
    loss.backward()
    step = before - 0.1 * layer.weight.grad
    norms = step.norm(dim=1, keepdim=True)
    expected = step * (1 - 0.1 * 0.5 / norms).clamp_min(0)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), expected)
    zero_rows = (layer.weight == 0).all(dim=1)
    assert zero_rows.tolist() == [False, True, False, True, False]


def test_coupled_l2sp_and_group_lasso_equal_the_autograd_path():
    def run(attach):
        torch.manual_seed(0)
        model = net()
        coll = rc.Collection()
        rc.regularize(model, kernel=rc.L2SP(0.3), collection=coll, exclude=["5.*"])
        rc.add_regularizer(model, "5.weight", rc.GroupLasso(0.2), collection=coll)
        perturb(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if attach:
            rc.attach_optimizer(opt, collection=coll)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            x, y = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 4, generator=g)
            opt.zero_grad()
            (torch.nn.functional.mse_loss(model(x), y) + coll.loss()).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_decoupled_l2sp_pulls_towards_the_reference():
    layer = torch.nn.Linear(3, 3)
    w0 = layer.weight.detach().clone()
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.L2SP(0.25), collection=coll)
    perturb(layer)
    opt = torch.optim.SGD([layer.weight], lr=0.2)
    rc.attach_optimizer(opt, decoupled=True, collection=coll)
    w = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(w)
    opt.step()
    # w -= lr * 2 * l2 * (w - w0), then the (zero-gradient) SGD update
    torch.testing.assert_close(layer.weight.detach(), w - 0.2 * 0.5 * (w - w0))


def test_l2sp_second_backward_and_double_backward():
    layer = torch.nn.Linear(3, 3).double()
    w0 = layer.weight.detach().clone()
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.L2SP(0.5), collection=coll)
    perturb(layer)
    total = coll.loss()
    total.backward(retain_graph=True)  # the kept differences become the gradient in place
    total.backward()  # computed again from the weights
    torch.testing.assert_close(layer.weight.grad, 2 * (layer.weight.detach() - w0))
    (grad,) = torch.autograd.grad(coll.loss(), layer.weight, create_graph=True)
    (hessian_diag,) = torch.autograd.grad(grad.sum(), layer.weight)
    torch.testing.assert_close(hessian_diag, torch.ones_like(w0))  # d2/dw2 of 0.5 (w - w0)^2


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (128, 64, 3, 3)], ids=["stacked", "large"])
def test_group_lasso_engine_values_and_gradcheck(shape):
    # Small kernels of one shape are stacked into one node; large ones get a norm each.
    holder = torch.nn.Module()
    coll = rc.Collection()
    for i in range(3):
        holder.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(shape).double()))
        rc.add_regularizer(holder, f"w{i}", rc.GroupLasso(0.3, axis=1), collection=coll)
    total = coll.loss()
    expected = sum(
        0.3 * w.detach().transpose(0, 1).flatten(1).norm(dim=1).sum().item()
        for w in holder.parameters()
    )
    assert total.item() == pytest.approx(expected, rel=1e-10)
    if shape[0] > 6:  # gradcheck of 3 x 73728 inputs would take minutes: the formula
        total.backward()
        for w in holder.parameters():
            norms = w.detach().transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, 1, 1)
            torch.testing.assert_close(w.grad, 0.3 * w.detach() / norms)
        return

    def penalty(*ws):
        for i, w in enumerate(ws):
            holder._parameters[f"w{i}"] = w
        return coll.loss()

    inputs = tuple(w.detach().clone().requires_grad_() for w in holder.parameters())
    assert torch.autograd.gradcheck(penalty, inputs)


# -- the L2-SP reference through every load (issue 26, item 3) ----------------------------


def l2sp_layer(pretrained):
    layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.L2SP(1.0))
    layer.load_state_dict(pretrained)
    return layer


def test_a_meta_initialised_model_loaded_with_assign_keeps_a_reference_of_its_own():
    # What HF from_pretrained does: build on the meta device, then load with assign=True.
    pretrained = torch.nn.Linear(2, 2).state_dict()
    with torch.device("meta"):
        layer = rc.nn.Linear(2, 2, kernel_regularizer=rc.L2SP(1.0))
    original = {k: v.clone() for k, v in pretrained.items()}  # assign=True takes these tensors
    layer.load_state_dict(pretrained, assign=True, strict=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (layer(torch.ones(1, 2)).sum() + rc.loss()).backward()
        opt.step()
    moved = ((layer.weight.detach() - original["weight"]) ** 2).sum().item()
    assert moved > 0 and rc.loss().item() == pytest.approx(moved, rel=1e-5)


def test_an_override_or_a_removed_handle_gives_l2sp_its_own_reference_back():
    pretrained = torch.nn.Linear(2, 2).state_dict()
    model = torch.nn.Sequential(l2sp_layer(pretrained))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # fine-tuned away: L2-SP = 1.0 * 4 * 1.0
    assert rc.loss().item() == pytest.approx(4.0, rel=1e-6)
    with rc.regularize(model, kernel=rc.l2(0.1)):
        pass
    assert rc.loss().item() == pytest.approx(4.0, rel=1e-6)
    rc.add_regularizer(model[0], "weight", rc.l1(0.1)).remove()
    assert rc.loss().item() == pytest.approx(4.0, rel=1e-6)


def test_clearing_the_collection_leaves_the_pretrained_reference_on_the_model():
    pretrained = torch.nn.Linear(2, 2).state_dict()
    layer = l2sp_layer(pretrained)
    with torch.no_grad():
        layer.weight.add_(1.0)
    rc.get_collection().clear()
    assert torch.equal(layer.state_dict()["weight_l2sp_reference"], pretrained["weight"])
    rc.add_regularizer(layer, "weight", rc.L2SP(1.0))  # set-up run again: same reference
    assert rc.loss().item() == pytest.approx(4.0, rel=1e-6)


def test_an_explicit_reference_survives_a_parameters_only_load():
    reference = torch.zeros(2, 2)
    layer = torch.nn.Linear(2, 2)
    rc.add_regularizer(layer, "weight", rc.L2SP(1.0, reference=reference))
    checkpoint = {k: v for k, v in torch.nn.Linear(2, 2).state_dict().items()}  # no buffer
    layer.load_state_dict(checkpoint, strict=False)
    want = (checkpoint["weight"] ** 2).sum().item()  # still towards the explicit zeros
    assert rc.loss().item() == pytest.approx(want, rel=1e-6)


# -- transposed convolutions: weights laid out (in, out / groups, *kernel) ------------------


def _output_filters(weight, groups):
    """One row per output channel of a ConvTranspose weight, by hand."""
    in_channels, out_per_group = weight.shape[:2]
    per_group = weight.reshape(groups, in_channels // groups, out_per_group, -1)
    return per_group.transpose(1, 2).reshape(groups * out_per_group, -1)


@pytest.mark.parametrize("groups", [1, 2])
def test_orthogonal_outputs_and_inputs_on_a_transposed_convolution(groups):
    """mode="outputs" makes the output filters orthogonal on every layer, ConvTranspose
    included, whose weight holds input channels first: it was applied to them instead."""
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(4, 6, kernel_size=2, groups=groups)
    coll = rc.Collection()
    for mode, matrix in (("outputs", lambda w: w), ("inputs", lambda w: w.t())):
        rc.add_regularizer(layer, "weight", rc.orthogonal(0.3, mode=mode), collection=coll)
        filters = matrix(_output_filters(layer.weight, groups))
        want = rc.orthogonal(0.3, mode="rows")(filters)
        assert coll.loss().item() == pytest.approx(want.item(), rel=1e-6)
    # Output filters made orthonormal (one-hot, distinct): no penalty.
    filters = torch.eye(6, 16 // groups)
    in_per_group = 4 // groups
    weight = filters.reshape(groups, 6 // groups, in_per_group, 2, 2).transpose(1, 2)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(4, 6 // groups, 2, 2))
    assert torch.equal(_output_filters(layer.weight, groups), filters)
    rc.add_regularizer(layer, "weight", rc.orthogonal(0.3, mode="outputs"), collection=coll)
    assert coll.loss().item() == 0.0


def test_group_lasso_on_a_transposed_convolution_removes_output_channels_with_axis_1():
    """The docs' mapping: on ConvTranspose, output channels are axis=1 (axis=0 groups the
    input channels). The proximal step zeroes whole output channels: their outputs are the
    bias alone."""
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(3, 5, kernel_size=2)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0]).view(1, 5, 1, 1))
    coll = rc.Collection()
    rc.add_regularizer(layer, "weight", rc.group_lasso(0.5, axis=1), collection=coll)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    rc.attach_optimizer(opt, collection=coll, decoupled=True)
    x = torch.randn(2, 3, 4, 4)
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    opt.step()
    y = layer(x).detach()
    for channel in (1, 3):
        assert torch.equal(layer.weight[:, channel], torch.zeros(3, 2, 2))
        assert torch.equal(y[:, channel], layer.bias[channel].detach().expand(2, 5, 5))
    assert layer.weight[:, 0].abs().sum() > 0


def test_the_papers_l2sp_objective_is_l2sp_half_alpha_on_every_shared_parameter():
    """Li et al.'s objective, alpha/2 * ||w_S - w_S0||^2 + beta/2 * ||w_new||^2 with w_S every
    parameter shared with the pretrained network (biases and normalisation layers included),
    is ``rc.L2SP(alpha / 2)`` on the shared ones and ``rc.l2(beta / 2)`` on the head, as
    beyond.md writes it."""
    torch.manual_seed(0)
    alpha, beta = 0.1, 0.01
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
    )
    model.fc = torch.nn.Linear(4 * 6 * 6, 5)  # the new head
    pretrained = {k: v.clone() for k, v in model.named_parameters() if not k.startswith("fc.")}
    coll = rc.Collection()
    shared = rc.L2SP(alpha / 2)
    rc.regularize(model, kernel=shared, bias=shared, norm=shared, exclude=["fc.*"], collection=coll)
    head = rc.l2(beta / 2)
    rc.regularize(model, kernel=head, bias=head, include=["fc.*"], collection=coll)
    with torch.no_grad():  # fine-tuning moved everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    params = dict(model.named_parameters())
    want = alpha / 2 * sum(((params[k] - w0) ** 2).sum() for k, w0 in pretrained.items())
    want = want + beta / 2 * sum((p**2).sum() for k, p in params.items() if k.startswith("fc."))
    assert len(coll.entries()) == len(params) == 6
    assert coll.loss().item() == pytest.approx(want.item(), rel=1e-6)
