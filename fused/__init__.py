"""The fused CPU engine of a LARNN layer: larnn_layer.cpp, built on first use, and its
autograd wrapper.

larnn.py is the model and the reference; LARNNCell.sequence hands its work here when
`applies(inputs)`: CPU tensors of float32 or float64, and the extension built. The
environment variable LARNN_BACKEND picks the path: "auto" (the default: fused where it
applies, else PyTorch), "fused" (fused or a clear error) or "pytorch" (never build).

The build uses torch.utils.cpp_extension (a C++ compiler and ninja) and is cached by
torch in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR), so it runs once per machine
and source version, in about half a minute (per checkout: each folder has its build,
so that two clones do not rebuild each other's). Where it fails, one line says why and
the PyTorch path runs.

Dropout: both masks are hashes of seeds drawn from torch's generator (see the .cpp);
the hidden mask is made here ([T, B, H] at once), the attention's in the layer, where
its backward draws it again. draw_dropout is the one place both are drawn, and
attention_dropout_masks expands a seed into its masks, so that tests can replay them in
the reference.
"""
import functools
import hashlib
import os
import pathlib
import sys
import threading
import weakref

import torch
from torch.autograd.function import once_differentiable

from fused import threads

BACKENDS = ("auto", "fused", "pytorch")
SOURCE = pathlib.Path(__file__).with_name("larnn_layer.cpp")
# g++'s flags for the vector unit torch reports, and the macros that select ATen's vector
# types (at::vec) for it; other units get at::vec's portable scalar version. With
# AVX-512, 512-bit vectors and their masked tails suit loops whose length is a head count
# like 27.
VECTOR_FLAGS = {"AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
                "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                           "-mprefer-vector-width=512", "-DCPU_CAPABILITY=AVX512",
                           "-DCPU_CAPABILITY_AVX512"]}
PORTABLE_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]
BUILD_NOTICE_S = 2  # a load that takes longer is a build: say so


def backend():
    choice = os.environ.get("LARNN_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"LARNN_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def build_name(capability, source=SOURCE):
    """The extension's name in torch's cache: one per vector unit and source folder. One
    name for two checkouts made each rebuild the other's build (ninja keys on paths)."""
    folder = hashlib.sha256(str(pathlib.Path(source).resolve().parent).encode()).hexdigest()
    return f"larnn_fused_{capability.lower()}_{folder[:10]}"


@functools.cache
def extension():
    """The built extension module, or None (with one line on stderr) where it cannot be
    built and LARNN_BACKEND is not "fused"."""
    try:
        from torch.utils import cpp_extension
        # The loops are compiled for the vector unit torch found (one build per kind,
        # so a cache shared by different machines never runs an unsupported one).
        capability = torch.backends.cpu.get_cpu_capability()
        vector_flags = VECTOR_FLAGS.get(capability, PORTABLE_FLAGS)
        # A cached build loads in well under a second; a longer wait is a compile, which
        # would otherwise look like a hang.
        notice = threading.Timer(BUILD_NOTICE_S, print, [
            "larnn: building the fused LARNN layer with g++, once per machine and version "
            "(about 30 s)"], {"file": sys.stderr, "flush": True})
        notice.start()
        try:
            # -fno-trapping-math changes no result: it lets g++ vectorise the loops of
            # exp_clamped, whose floor and float-to-int conversion could otherwise trap.
            return cpp_extension.load(name=build_name(capability),
                                      sources=[str(SOURCE)],
                                      extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp",
                                                    *vector_flags],
                                      extra_ldflags=["-fopenmp"])
        finally:
            notice.cancel()
    except Exception as error:  # no compiler, no ninja, a failed compile: all the same here
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = next((line for line in lines if "error:" in line), lines[0])
        message = (f"the fused LARNN layer could not be built ({reason}); install a C++ "
                   f"compiler and ninja (requirements.txt) to get it")
        if backend() == "fused":
            raise RuntimeError(message + ", or unset LARNN_BACKEND=fused") from None
        print(f"larnn: {message}; using the slower PyTorch path", file=sys.stderr)
        return None


def applies(inputs):
    """Whether LARNNCell.sequence should run these inputs here."""
    choice = backend()
    if choice == "pytorch":
        return False
    supported = inputs.device.type == "cpu" and inputs.dtype in (torch.float32, torch.float64)
    if not supported:
        if choice == "fused":
            raise ValueError(f"LARNN_BACKEND=fused runs float32 or float64 on the CPU; got "
                             f"{inputs.dtype} on {inputs.device} (unset LARNN_BACKEND)")
        return False
    return extension() is not None


def attention_dropout_masks(seed, p, steps, window, batch, heads):
    """[steps, window, batch, heads], float64: the attention dropout mask (0 or
    1 / (1 - p)) that a pass with this seed applies to slot j of step s's window."""
    return extension().attention_dropout_masks(seed, p, steps, window, batch, heads)


def draw_dropout(cell, steps, batch, dtype):
    """(hidden mask [T, B, H] of 0 and 1 / (1 - p), or None; attention dropout's seed, or
    None), both from seeds drawn from torch's generator, so that torch.manual_seed fixes
    them."""
    hidden_mask = seed = None
    if cell.training and cell.dropout > 0:
        hidden_mask = torch.empty(steps, batch, cell.hidden_size, dtype=dtype)
        extension().fill_dropout_mask(hidden_mask, draw_seed(), cell.dropout)
    if cell.training and cell.use_attention and cell.attention_dropout > 0:
        seed = draw_seed()
    return hidden_mask, seed


def draw_seed():
    return int(torch.randint(2 ** 62, ()).item())


NORMS = ("keys_norm", "values_norm", "attention_norm", "gates_norm", "cell_norm", "hidden_norm")


def norm_tensors(cell, empty):
    """The six BatchNorms' gains, shifts, running means and variances (empty where the
    cell has none), in larnn_layer.cpp's order."""
    norms = [getattr(cell, name, None) for name in NORMS]
    return [[getattr(n, field) if n is not None else empty for n in norms]
            for field in ("weight", "bias", "running_mean", "running_var")]


def weights(cell, empty):
    """The inputs' weight and bias, W_in = [W_q,x; W_x] and b_in = [b_q; b] (W_x and b
    alone without attention), and the seven weights of larnn_layer.cpp: [W_qh; W_h],
    W_a, [W_k,c; W_v,c], [b_k; b_v], the pe terms of keys and values per distance
    [k, 2H], W_o, b_o."""
    H, I = cell.hidden_size, cell.input_size
    W_x, W_h, W_a, bias = cell.gate_weights()
    if not cell.use_attention:
        return (W_x, bias), [W_h, empty, empty, empty, empty, empty, empty]
    W_qx, W_qh = cell.query.weight.split([I, H], dim=1)
    keys, values = cell.keys.weight, cell.values.weight
    pe_kv = (torch.cat([cell.pe @ keys[:, H:].T, cell.pe @ values[:, H:].T], dim=1)
             if cell.use_positional_encoding else empty)
    return (torch.cat([W_qx, W_x]), torch.cat([cell.query.bias, bias])), [
        torch.cat([W_qh, W_h]), W_a, torch.cat([keys[:, :H], values[:, :H]]),
        torch.cat([cell.keys.bias, cell.values.bias]), pe_kv,
        cell.attention_output.weight, cell.attention_output.bias]


class FusedLayer(torch.autograd.Function):
    """One layer pass through larnn_layer.cpp; its backward is the C++ one."""

    @staticmethod
    def forward(ctx, make_pass, inputs, W_in, b_in, h0, c0, cells0, hidden_mask, *params):
        layer_pass = make_pass(list(params))
        # The pass (and so its buffers, back to the pool) goes when autograd frees what
        # this node saved, after a backward without retain_graph; holding it until the
        # graph is dropped would keep a training loop's last step alive through its
        # next forward (the loop's last loss refers to the graph). The list is what the
        # callback empties.
        ctx.layer_pass = [layer_pass]
        token = inputs.new_empty(0)
        ctx.save_for_backward(token)
        ctx.release = weakref.ref(token, lambda _, held=ctx.layer_pass: held.clear())
        return tuple(layer_pass.forward(inputs, W_in, b_in, h0, c0, cells0, hidden_mask, True))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_outputs, d_h, d_c, d_cells):
        ctx.saved_tensors  # autograd's own error where a backward already freed them
        layer_pass, = ctx.layer_pass
        threads.fit()
        grads = layer_pass.backward(d_outputs.contiguous(), d_h.contiguous(),
                                    d_c.contiguous(), d_cells.contiguous())
        return (None, *grads[:6], None, *grads[6:])


def sequence(cell, inputs, state=None):
    """LARNNCell.sequence through the fused layer: (outputs [T, B, H], state)."""
    T, B, _ = inputs.shape
    h0, c0, cells0, start = cell.initial_state(inputs) if state is None else state
    empty = inputs.new_empty(0)
    (W_in, b_in), layer_weights = weights(cell, empty)
    gains, shifts, means, variances = norm_tensors(cell, empty)
    hidden_mask, seed = draw_dropout(cell, T, B, inputs.dtype)
    hidden_mask = empty if hidden_mask is None else hidden_mask
    attention_dropout = 0.0 if seed is None else cell.attention_dropout
    norm = cell.gates_norm

    def make_pass(params):
        return extension().LayerPass(
            params[:7], params[7:13], params[13:], means, variances, cell.attention_heads,
            cell.larnn_window_size, start, cell.use_attention, cell.use_positional_encoding,
            cell.activation_on_keys_and_values, cell.cell_norm_placement == "recurrence",
            cell.training, attention_dropout, norm.momentum, norm.eps, seed or 0)

    tensors = [inputs, W_in, b_in, h0, c0, cells0, hidden_mask, *layer_weights, *gains,
               *shifts]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outputs, h, c, cells = FusedLayer.apply(make_pass, *tensors)
    else:
        params = [t.detach() for t in tensors[7:]]
        outputs, h, c, cells = make_pass(params).forward(*[t.detach() for t in tensors[:7]],
                                                         False)
    return outputs, (h, c, cells, start + T)
