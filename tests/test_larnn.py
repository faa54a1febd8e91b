"""The fast LARNN against the line-by-line reference, plus its interface contracts.

The equivalence tests run with every dropout off and with both on (attention and
hidden): the reference then applies exactly the masks the model under test drew
(dropout_masks), since the fast path's algebra (BN_V folded in through sum(p), the
dropped h carried) differs from the plain equations only when dropout is on.
"""
import contextlib
import copy
import gc
import itertools
import math
from unittest import mock

import pytest
import torch

import fused
import larnn
from reference_larnn import reference_cell, reference_classifier, reference_stack

T, B, I, H, HEADS = 6, 5, 4, 8, 2
DROPOUTS = {"without_dropout": dict(dropout=0.0, attention_dropout=0.0),
            "with_dropout": dict(dropout=0.3, attention_dropout=0.4)}


@pytest.fixture(autouse=True, params=["fused", "pytorch"])
def backend(request, monkeypatch):
    """Every test here runs on both paths of larnn.py: the fused C++ layer and PyTorch."""
    monkeypatch.setenv("LARNN_BACKEND", request.param)
    return request.param


def make_stack(num_layers, window, mode, pe, stacked=False, batchnorm_steps=T // 2,
               dropout=0.0, attention_dropout=0.0, **options):
    """Steps 0 .. T/2 - 2 get their own BN running statistics, later ones share a row."""
    torch.manual_seed(0)
    model = larnn.LARNN(H if stacked else I, H, HEADS, num_layers, window, mode, pe,
                        is_stacked_residual=stacked, dropout=dropout,
                        attention_dropout=attention_dropout,
                        batchnorm_steps=batchnorm_steps, **options)
    return model.double()


@contextlib.contextmanager
def dropout_masks(masks, replay=False):
    """F.dropout, in training: record the masks torch draws (in call order) into
    `masks`, or with replay=True apply those masks, in the same order, instead of new
    ones. A mask is torch's own dropout of ones (0 or 1 / (1 - p)), so recording does
    not change what the model computes. The fused layer (fused/) draws its masks in
    fused.draw_dropout, recorded here too."""
    draw = torch.nn.functional.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        if replay:
            assert masks, "the reference draws more dropout masks than the model did"
            mask = masks.pop(0)
            assert mask.shape == x.shape, f"dropout mask {tuple(mask.shape)} for {tuple(x.shape)}"
        else:
            mask = draw(torch.ones_like(x), p, training)
            masks.append(mask)
        return x * mask

    def fused_draw(cell, steps, batch, dtype):
        """The fused layer's masks, recorded in the order the reference draws them:
        per step, the attention mask of its window (from the initial window of one
        entry), then the hidden mask."""
        hidden_mask, seed = draw_fused(cell, steps, batch, dtype)
        heads, k = cell.attention_heads, cell.larnn_window_size
        attention = None if seed is None else fused.attention_dropout_masks(
            seed, cell.attention_dropout, steps, k, batch, heads).to(dtype)
        for step in range(steps):
            if attention is not None:
                masks.append(attention[step, :min(k, step + 1)])
            if hidden_mask is not None:
                masks.append(hidden_mask[step])
        return hidden_mask, seed

    draw_fused = fused.draw_dropout
    with mock.patch.object(torch.nn.functional, "dropout", dropout), \
            mock.patch.object(fused, "draw_dropout", fused_draw):
        yield
    assert not (replay and masks), f"{len(masks)} dropout masks were not used by the reference"


def randomise_batchnorms(model):
    """Non-trivial BN affine parameters, so that the BN algebra is really exercised."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)


def run_and_grad(forward, model, inputs):
    outputs = forward(model, inputs)
    (outputs * torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype)
     .view_as(outputs)).sum().backward()
    # BN_K's bias adds a constant to every score of a head, which softmax ignores: its
    # gradient is exactly zero, and the fast path does not even build it (None).
    return outputs, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for n, p in model.named_parameters()}


def assert_matches_reference(model, inputs, forward=lambda m, x: m(x)[0],
                             reference_forward=reference_stack):
    """Outputs and every parameter gradient of forward(model) equal those of
    reference_forward on a deep copy, with the same dropout masks; returns the copy."""
    reference, masks = copy.deepcopy(model), []
    with dropout_masks(masks):
        fast_out, fast_grads = run_and_grad(forward, model, inputs)
    assert bool(masks) == (model.training and has_dropout(model))  # the patch took effect
    with dropout_masks(masks, replay=True):
        ref_out, ref_grads = run_and_grad(reference_forward, reference, inputs)
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-9, atol=1e-10)
    assert fast_grads.keys() == ref_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-7, atol=1e-9,
                                   msg=lambda m: f"gradient of {name}: {m}")
    return reference


def assert_matches_reference_in_training_and_eval(model, inputs):
    """With random BN gains and shifts: assert_matches_reference in training, then in
    eval mode, which reads the running statistics the training pass left behind."""
    randomise_batchnorms(model)
    assert_matches_reference(model.train(), inputs)
    model.zero_grad()
    assert_matches_reference(model.eval(), inputs)


def has_dropout(model):
    return any(isinstance(m, larnn.LARNNCell) and (m.dropout or m.attention_dropout)
               for m in model.modules())


CASES = list(itertools.product((1, 3), (2, 12), larnn.LARNN_MODES, (False, True)))


@pytest.mark.parametrize("dropouts", DROPOUTS)
@pytest.mark.parametrize("num_layers,window,mode,pe", CASES)
def test_matches_reference_in_training_then_eval(num_layers, window, mode, pe, dropouts):
    model = make_stack(num_layers, window, mode, pe, **DROPOUTS[dropouts])
    randomise_batchnorms(model)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    reference = assert_matches_reference(model.train(), inputs)
    # Eval mode reads the running statistics that the training pass left behind.
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    model.zero_grad()
    assert_matches_reference(model.eval(), inputs)


@pytest.mark.parametrize("options", [dict(activation_on_keys_and_values=False),
                                     dict(activation_on_keys_and_values=False, pe=False),
                                     dict(use_attention=False), dict(stacked=True),
                                     dict(cell_norm_placement="output"),
                                     dict(cell_norm_placement="output", use_attention=False)])
@pytest.mark.parametrize("dropouts", DROPOUTS)
def test_matches_reference_variants(options, dropouts):
    options = {"pe": True, **options, **DROPOUTS[dropouts]}
    model = make_stack(2, 3, "residual", options.pop("pe"), **options)
    inputs = torch.randn(T, B, H if options.get("stacked") else I, dtype=torch.float64)
    assert_matches_reference_in_training_and_eval(model, inputs)


@pytest.mark.parametrize("pe", (False, True))
def test_matches_reference_when_the_work_is_split_over_threads(pe, monkeypatch):
    """The fused layer splits its work by samples, one block of at least 16 per thread,
    and sums over the batch (the BatchNorms' statistics) one partial sum per block: 41
    samples on 2 threads give blocks of 20 and 21, with both dropouts on (two threads
    even on a loaded machine: LARNN_THREADS=fixed)."""
    monkeypatch.setenv("LARNN_THREADS", "fixed")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = larnn.LARNN(32, 32, 4, 1, 4, "residual", pe, dropout=0.3,
                            attention_dropout=0.4, batchnorm_steps=2).double()
        assert_matches_reference_in_training_and_eval(
            model, torch.randn(5, 41, 32, dtype=torch.float64))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("heads", (1, 8, 27))
@pytest.mark.parametrize("pe", (False, True))
def test_matches_reference_for_head_counts_around_the_vector_width(heads, pe):
    """The fused attention runs its loops over the heads one vector at a time, the last
    vector partial: float64 vectors hold 8 with AVX-512 and 4 with AVX2, so 8 heads fill
    one or two, and 27 = 3 x 8 + 3 = 6 x 4 + 3 end with a partial one."""
    torch.manual_seed(0)
    model = larnn.LARNN(I, 2 * heads, heads, 1, 4, "residual", pe, dropout=0.3,
                        attention_dropout=0.4, batchnorm_steps=2).double()
    assert_matches_reference_in_training_and_eval(model, torch.randn(T, B, I, dtype=torch.float64))


@pytest.mark.parametrize("pe", (False, True))
def test_float32_matches_the_float64_reference_in_eval(pe):
    """The float32 code, which training runs (27 heads: one full vector of 16 floats and
    a partial one with AVX-512), against the float64 reference. In eval mode nothing is
    ill-conditioned: float32's rounding, grown over 6 steps and 2 layers, stays under
    1e-5 of each tensor's largest value (measured: 4e-7 for outputs, 1e-6 for
    gradients). In training mode, BN_K's and BN_V's batch statistics are ill-conditioned
    where the spread is small against the mean, so that comparison is float64's (above;
    and the next test)."""
    torch.manual_seed(0)
    model = larnn.LARNN(I, 54, 27, 2, 4, "residual", pe, dropout=0.0,
                        attention_dropout=0.0, batchnorm_steps=2).double().eval()
    randomise_batchnorms(model)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    outputs, grads = run_and_grad(lambda m, x: m(x)[0], copy.deepcopy(model).float(),
                                  inputs.float())
    ref_outputs, ref_grads = run_and_grad(reference_stack, model, inputs)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    torch.testing.assert_close(outputs.double(), ref_outputs, rtol=0,
                               atol=1e-5 * ref_outputs.abs().max().item())
    for name in grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=0,
                                   atol=1e-5 * scale, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("pe", (False, True))
def test_window_batchnorm_stays_finite_where_the_mean_dwarfs_the_spread(pe):
    """Keys and values near 300 with a spread of about 1e-3, in float32 and training:
    mean(x^2) - mean(x)^2 cancelled to a negative variance and NaN outputs (a search
    trial's loss did, in epoch 1); centred sums keep them finite and near the float64
    reference's (BatchNorm magnifies float32's rounding of x - mean here, hence the
    tolerance)."""
    torch.manual_seed(0)
    model = larnn.LARNN(I, 54, 27, 1, 4, "residual", pe, dropout=0.0,
                        attention_dropout=0.0, batchnorm_steps=2).double()
    for cell in model.modules():
        if isinstance(cell, larnn.LARNNCell):
            with torch.no_grad():
                for projection in (cell.keys, cell.values):
                    projection.weight.mul_(1e-2)
                    projection.bias.fill_(300)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    with torch.no_grad():
        outputs = copy.deepcopy(model).float()(inputs.float())[0]
        reference = reference_stack(model, inputs)
    assert torch.isfinite(outputs).all()
    torch.testing.assert_close(outputs.double(), reference, rtol=0,
                               atol=0.1 * reference.abs().max().item())


@pytest.mark.parametrize("pe", (False, True))
@pytest.mark.parametrize("training", (True, False))
def test_outputs_without_autograd_equal_those_with_it(pe, training):
    """Without a graph the fused layer keeps one step's buffers, not every step's."""
    model = make_stack(2, 3, "residual", pe, dropout=0.0, attention_dropout=0.0).train(training)
    randomise_batchnorms(model)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        outputs, state = model(inputs)
    expected, expected_state = reference(inputs)
    torch.testing.assert_close(outputs, expected.detach(), rtol=0, atol=0)
    for a, b in zip(itertools.chain(*state), itertools.chain(*expected_state)):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("placement", larnn.CELL_NORM_PLACEMENTS)
def test_cell_norm_placement_decides_whether_bn_c_scales_the_carried_cell(placement):
    """One step from zero state, so that BN_c cannot reach c through h_{t-1}."""
    model = make_stack(1, 3, "residual", False, cell_norm_placement=placement).eval()
    inputs = torch.randn(1, B, I, dtype=torch.float64)
    with torch.no_grad():
        outputs, [(_, c, _, _)] = model(inputs)
        model.layers[0].cell_norm.weight.mul_(2)
        scaled_outputs, [(_, scaled_c, _, _)] = model(inputs)
    assert not torch.allclose(outputs, scaled_outputs)
    assert torch.allclose(c, scaled_c) == (placement == "output")


@pytest.mark.parametrize("training", (True, False))
def test_two_halves_carrying_state_equal_one_call(training):
    model = make_stack(2, 3, "residual", True).train(training)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    whole, whole_state = model(inputs)
    first, state = model(inputs[:T // 2])
    second, state = model(inputs[T // 2:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    for a, b in zip(itertools.chain(*state), itertools.chain(*whole_state)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pe", (False, True))
def test_gradients_through_carried_state_equal_one_call(pe):
    """Truncated BPTT without detaching: the second half's window starts with the first
    half's cell values, whose gradients flow back through the state."""
    model = make_stack(2, 3, "residual", pe)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    weights = torch.randn(T, B, H, dtype=torch.float64)

    def gradients(halves):
        model.zero_grad()
        state, outputs = None, []
        for part in inputs.chunk(halves):
            out, state = model(part, state)
            outputs.append(out)
        (torch.cat(outputs) * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(gradients(1), gradients(2), strict=True):
        torch.testing.assert_close(a, b)


def test_backward_twice_through_a_retained_graph_gives_the_same_gradients():
    """The window's entries collect their gradients outside autograd (larnn.EntryBuffer):
    a second backward must not see the first one's sums."""
    model = make_stack(2, 3, "residual", False)
    loss = model(torch.randn(T, B, I, dtype=torch.float64))[0].square().sum()
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True,
                                allow_unused=True)
    second = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for a, b in zip(first, second):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_window_buffers_are_freed_after_backward():
    """The graph refers to the window's buffers; were they to refer back to the graph,
    the cycle would run through autograd's C++ nodes, which Python's collector cannot
    see, and every training step would leak them."""
    model = make_stack(2, 3, "residual", False)
    model(torch.randn(T, B, I, dtype=torch.float64))[0].sum().backward()
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is larnn.EntryBuffer]


def test_state_matches_reference_and_cell_steps_one_at_a_time():
    model = make_stack(1, 3, "layer", True)
    cell = model.layers[0]
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    outputs, (h, c, cells, t) = cell.sequence(inputs)
    _, (h_ref, c_ref, cells_ref, t_ref) = reference_cell(copy.deepcopy(cell), inputs)
    for a, b in ((h, h_ref), (c, c_ref), (cells, cells_ref)):
        torch.testing.assert_close(a, b)
    assert cells.shape == (3, B, H) and t == t_ref == T
    state, steps = None, []
    for x in inputs:
        h_t, state = cell(x, state)
        steps.append(h_t)
    torch.testing.assert_close(torch.stack(steps), outputs)


@pytest.mark.parametrize("batchnorm_steps", (1, T))
def test_eval_reproduces_training_with_per_step_statistics(batchnorm_steps):
    """With momentum 1 the running statistics hold the last batch's. Per step (one row
    per step), eval mode then normalises exactly as that training pass did; with one
    row shared by all steps it holds only the last step's and cannot."""
    window, batch = 3, 64
    model = make_stack(2, window, "residual", False, batchnorm_steps=batchnorm_steps)
    randomise_batchnorms(model)
    inputs = torch.randn(T, batch, I, dtype=torch.float64)
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, larnn.StepBatchNorm)]
    for _, norm in norms:
        norm.momentum = 1.0
    with torch.no_grad():
        training = model.train()(inputs)[0]
        # Training divides by the biased batch variance, eval by the stored unbiased one.
        for name, norm in norms:
            for t, row in enumerate(norm.running_var):
                entries = min(t + 1, window) if name.endswith(("keys_norm", "values_norm")) else 1
                row *= 1 - 1 / (batch * entries)
        evaluation = model.eval()(inputs)[0]
    if batchnorm_steps == T:
        torch.testing.assert_close(evaluation, training)
    else:
        assert not torch.allclose(evaluation, training, atol=1e-3)


def classifier_config(**changes):
    return {**dict(hidden_size=H, attention_heads=HEADS, num_layers=3, larnn_window_size=3,
                   larnn_mode="residual", use_positional_encoding=True,
                   activation_on_keys_and_values=True, is_stacked_residual=True, dropout=0.1,
                   cell_norm_placement="recurrence"), **changes}


@pytest.mark.parametrize("model_name", larnn.MODELS)
def test_classifier_matches_reference(model_name):
    """ELU of the input projection, the core, the last step, the output layer. nn.LSTM
    draws its dropout between layers inside its own kernel, out of dropout_masks'
    reach, so the LSTM is compared without it."""
    torch.manual_seed(0)
    config = classifier_config(dropout=0.0 if model_name == "lstm" else 0.3)
    model = larnn.ActivityClassifier(I, 3, config, model_name, batchnorm_steps=T).double()
    for cell in model.modules():
        if isinstance(cell, larnn.LARNNCell):
            cell.attention_dropout = 0.4
    randomise_batchnorms(model)
    inputs = torch.randn(B, T, I, dtype=torch.float64)
    for training in (True, False):
        model.zero_grad()
        assert_matches_reference(model.train(training), inputs, lambda m, x: m(x),
                                 reference_classifier)


@pytest.mark.parametrize("model_name", larnn.MODELS)
def test_initialisation_is_xavier_uniform(model_name):
    """Every weight matrix U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) (PyTorch's
    default, b = 1 / sqrt(fan_in), differs by up to sqrt(3) for square matrices);
    nn.Linear biases 0; BatchNorms at gain 1 and shift 0; nn.LSTM's biases PyTorch's
    U(-1 / sqrt(H), 1 / sqrt(H))."""
    torch.manual_seed(0)
    config = classifier_config(hidden_size=48, attention_heads=4, larnn_window_size=5)
    model = larnn.ActivityClassifier(9, 6, config, model_name)
    matrices = 0
    for name, param in model.named_parameters():
        if param.dim() == 2:
            fan_out, fan_in = param.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert param.abs().max() <= bound, name
            # The standard deviation of U(-b, b) is b / sqrt(3); the classifier's 48 x 6
            # is the smallest matrix here, where 12% is 4.5 standard errors.
            assert param.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.12), name
            matrices += 1
        elif name.endswith("norm.weight"):
            assert (param == 1).all(), name
        elif name.startswith("core.bias_"):
            bound = 1 / math.sqrt(config["hidden_size"])
            assert param.abs().max() <= bound and param.std() > bound / 2, name
        else:
            assert (param == 0).all(), name
    # embed, classify; per layer q, K, V, W_o, W_x, W_h, W_a, or W_x, W_h (nn.LSTM: W_ih, W_hh)
    assert matrices == 2 + 3 * (7 if model_name == "larnn" else 2)


@pytest.mark.parametrize("model_name", larnn.MODELS)
def test_every_parameter_gets_a_gradient(model_name):
    config = classifier_config()
    model = larnn.ActivityClassifier(I, 3, config, model_name)
    logits = model(torch.randn(B, T, I))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    for name, param in model.named_parameters():
        if name.endswith("keys_norm.bias"):  # no effect on the output (run_and_grad)
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_layers_are_registered_independent_and_reached_by_train_eval():
    model = make_stack(3, 3, "residual", False)
    params = dict(model.named_parameters())
    assert any(n.startswith("layers.2.") for n in params)
    assert params["layers.1.query.weight"].data_ptr() != params["layers.2.query.weight"].data_ptr()
    norms = [m for m in model.modules() if isinstance(m, larnn.StepBatchNorm)]
    assert len(norms) == 3 * 6  # BN_K, BN_V, BN_a, BN_z, BN_c, BN_h in each layer
    model.eval()
    assert not any(m.training for m in norms)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of attention_heads.*nearest valid hidden_size is 81"):
        larnn.LARNN(9, 80, 27, 1, 10)
    with pytest.raises(ValueError, match="larnn_mode"):
        larnn.LARNN(9, 8, 2, 1, 10, larnn_mode="bogus")
    with pytest.raises(ValueError, match="cell_norm_placement must be one of"):
        larnn.LARNN(9, 8, 2, 1, 10, cell_norm_placement="inside")
    with pytest.raises(ValueError, match="input_size"):
        larnn.LARNN(9, 8, 2, 1, 10, is_stacked_residual=True)


def test_bad_inputs_and_states_are_named_not_broadcast():
    model = make_stack(2, 3, "residual", True)
    inputs = torch.randn(T, B, I, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"time first, \[T, B, 4\]; got shape \(6, 4\)"):
        model(inputs[:, 0])  # one sample without its batch dimension
    with pytest.raises(ValueError, match=r"time first, \[T, B, 4\]; got shape \(6, 5, 3\)"):
        model(inputs[..., :3])
    _, state = model(inputs)
    with pytest.raises(ValueError, match="not one for a batch of 2 .* pass state=None"):
        model(inputs[:, :2], state)
    with pytest.raises(ValueError, match="the state has 1 layers, the stack 2"):
        model(inputs, state[:1])
    with pytest.raises(ValueError, match="needs at least 2 samples per batch; got 1"):
        model(inputs[:, :1])
    model.eval()(inputs[:, :1])  # eval mode uses running statistics: one sample is fine


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = larnn.LARNN(I, H, HEADS, 2, 3, dropout=0.5)
    inputs = torch.randn(T, B, I)
    assert not torch.equal(model(inputs)[0], model(inputs)[0])
    model.eval()
    assert torch.equal(model(inputs)[0], model(inputs)[0])


def test_positional_encoding_features():
    pe = larnn.positional_encoding(38)  # b = ceil(log2(152)) = 8
    assert pe.shape == (38, 16)
    for row, p in ((0, 38), (37, 1)):  # the oldest entry comes first
        for i in range(1, 9):
            assert pe[row, i - 1].item() == pytest.approx(math.cos(2 * math.pi * p * 0.5 ** i), abs=1e-6)
            assert pe[row, 7 + i].item() == pytest.approx(math.sin(2 * math.pi * p * 0.5 ** (i + 1)), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = make_stack(2, 3, "residual", True).float().eval()
    inputs = torch.randn(T, B, I)
    cpu = model(inputs)[0]
    gpu = model.cuda()(inputs.cuda())[0].cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)
