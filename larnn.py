"""LARNN: the Linear Attention Recurrent Neural Network (arXiv 1808.05578).

The cell, the stack of cells and the paper's activity classifier, in one file.

One step of the cell, given x_t, h_{t-1}, c_{t-1} and the window C of the last k cell
values (oldest first, newest = c_{t-1}; at t = 1 it holds only c_0 = 0):

  (1) q   = ELU(W_q [x_t ; h_{t-1}])
  (2) pe  = cos/sin features of each window entry's distance p to the present
            (optional, concatenated to the entry, not added)
  (3) K   = BN_K(ELU(W_k [C ; pe]))        V = BN_V(ELU(W_v [C ; pe]))
            (or K = W_k [C ; pe], V = W_v [C ; pe] without activation_on_keys_and_values;
            the BN statistics run over batch x window)
  (4) a   = W_o concat_i(dropout(softmax(q_i K_i^T / sqrt(d))) V_i)    per head i
  (5) a   = BN_a(ELU(a))
  (6) z   = BN_z(W_x x_t + W_h h_{t-1} + W_a a + b)    ('residual' mode)
      z   = BN_z(W [x_t ; h_{t-1} ; a] + b)            ('layer' mode)
  (7) g, f, i, o = tanh(z_1), sigmoid(z_2), sigmoid(z_3), sigmoid(z_4)
  (8) c_t = BN_c(g * i + c_{t-1} * f)    h_t = dropout(BN_h(o * ELU(c_t)))
      and c_t is pushed on the window, the oldest entry dropping out past k.
      With cell_norm_placement="output" (Cooijmans et al.), BN_c moves out of the
      recurrence: c_t = g * i + c_{t-1} * f is carried and pushed as it is, and
      h_t = dropout(BN_h(o * ELU(BN_c(c_t)))). In eval mode BN_c is a fixed affine map
      whose gain can exceed 1, so inside the recurrence it can blow c up
      (results/UCIHAR/README.md, "Eval-mode BatchNorm").

With use_attention=False, steps (1)-(5) and the W_a a term vanish: a BN-LSTM with ELU
output, the paper's natural ablation baseline.

Every BN_* is one module per use site, its scale and shift shared by all time steps. In
training each step normalises with its own batch statistics; the running statistics
that eval mode uses are kept per step t < batchnorm_steps (later steps share the last
ones), as in Cooijmans et al., "Recurrent Batch Normalization" (2017). With
batchnorm_steps=1 there is one running average over all steps, the reference's choice;
its momentum makes it follow the last steps of the last batch (README.md, deviation 7).

Why it is fast. A naive step re-projects the whole window (k matrix products). Here
each cell value is projected once, when it enters the window, since W_k [c ; pe] =
W_k,c c + W_k,pe pe and the pe part depends only on the distance p. BatchNorm over the
window is an affine map per feature, y = s * x + m, with s and m computed from running
sums of each entry's batch moments. It commutes with attention: in the scores,
q . (s * K + m) = (q * s) . K + const per head, and softmax ignores constants; in the
read-out, p (s * V + m) = s * (p V) + m * sum(p). So the per-step work that grows with
k is the attention itself (plus, only with positional encoding, the ELU of K and V,
because the pe term changes with the distance before the nonlinearity).

Why it is small. Autograd would keep each step's window of keys and values, [k, B, H]
each, for the backward: about 2 GB at the published config. Here each pass keeps its
entries once, in a buffer outside autograd (EntryBuffer), and the attention's reads of
it (WindowRead) save only the query or the probabilities; their backward adds the
window's gradient to the buffer, which hands each entry the sum once.

On the CPU the same computation runs, by default, in a fused C++ layer (fused/, tested
against this file); this file is the model, the reference and the path on CUDA.

Run `python3 larnn.py` to print shapes and parameter counts of every configuration, and
of the published classifier.
"""
import functools
import itertools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import fused

LARNN_MODES = ("residual", "layer")
CELL_NORM_PLACEMENTS = ("recurrence", "output")
MODELS = ("larnn", "bnlstm", "lstm")
MODEL_NAMES = {"larnn": "LARNN", "bnlstm": "BN-LSTM", "lstm": "LSTM"}  # for tables and figures
# The best configuration published for UCI HAR (paper, second hyperopt round), and
# where BN_c sits ("recurrence" is the paper's eq. 8): ActivityClassifier's and
# train.py's hyperparameters, whose keys and types every config has.
PAPER_CONFIG = dict(hidden_size=81, attention_heads=27, larnn_window_size=38,
                    larnn_mode="residual", num_layers=3, is_stacked_residual=True,
                    use_positional_encoding=False, activation_on_keys_and_values=True,
                    cell_norm_placement="recurrence",
                    dropout=0.08885391813337816, learning_rate=0.006026504115228934,
                    l2_weight_reg=0.0006495900377590891, decay_each_N_epoch=26,
                    batch_size=256, training_epochs=100)


def positional_encoding(window_size):
    """[window_size, 2b] fixed features for distances p = k .. 1 (oldest entry first).

    b = ceil(log2(4k)); the features are cos(2 pi p 0.5^i) for i = 1..b, then
    sin(2 pi p 0.5^i) for i = 2..b+1.
    """
    b = math.ceil(math.log2(4 * window_size))
    p = torch.arange(window_size, 0, -1, dtype=torch.float64)[:, None]
    cos = torch.cos(2 * math.pi * p * 0.5 ** torch.arange(1, b + 1))
    sin = torch.sin(2 * math.pi * p * 0.5 ** torch.arange(2, b + 2))
    return torch.cat([cos, sin], dim=1).float()


def xavier_init(module):
    """Xavier-uniform for every weight matrix, zero for every nn.Linear bias; BatchNorm
    and nn.LSTM's biases (bias_ih_l*, bias_hh_l*) stay as PyTorch sets them."""
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            nn.init.xavier_uniform_(param)
        elif name.endswith("bias") and "norm" not in name:
            nn.init.zeros_(param)


class StepBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d with running statistics per time step: forward(x [B, H], step).

    Steps >= `steps` share the last row of running statistics; steps=1 is a plain
    BatchNorm1d called once per step. The running statistics are [steps, H]; momentum
    must be a number (None, BatchNorm1d's cumulative average, is not supported).
    """

    def __init__(self, num_features, steps=1):
        super().__init__(num_features)
        self.register_buffer("running_mean", torch.zeros(steps, num_features))
        self.register_buffer("running_var", torch.ones(steps, num_features))

    def running_stats(self, step):
        """Views of the running mean and variance rows of `step` (updated in place)."""
        row = min(step, len(self.running_mean) - 1)
        return self.running_mean[row], self.running_var[row]

    def forward(self, x, step):
        return F.batch_norm(x, *self.running_stats(step), self.weight, self.bias,
                            self.training, self.momentum, self.eps)


def window_moments(entry_mean, entry_var):
    """The mean and variance over window x batch from each entry's over the batch (all
    of B samples): the mean of the means, and of the variances plus (entry mean -
    mean)^2. Not mean(x^2) - mean(x)^2, which float32 cancels to a negative variance, and
    a NaN, where the mean is large against the spread (a search trial did, in epoch 1)."""
    mean = entry_mean.mean(0)
    return mean, (entry_var + (entry_mean - mean) ** 2).mean(0)


def window_norm_affine(norm, mean, var, count, step):
    """The per-feature (scale, shift) that StepBatchNorm `norm` applies at `step` to data
    whose per-feature mean and variance are given, over `count` samples.

    In training mode this also updates the running statistics exactly as
    F.batch_norm would (unbiased variance, momentum), so eval mode matches.
    """
    running_mean, running_var = norm.running_stats(step)
    if norm.training:
        with torch.no_grad():
            running_mean.lerp_(mean, norm.momentum)
            running_var.lerp_(var * count / (count - 1), norm.momentum)
    else:
        mean, var = running_mean, running_var
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    return scale, norm.bias - mean * scale


def head_dot(q, window, heads):
    """Per-head dot products of q [B, H] with each entry of window [w, B, H]: [w, B, heads].

    Head i takes the features f with f % heads == i (views [..., d, heads]): the same
    model as contiguous blocks up to a fixed permutation of the weights, and the sums
    over d then run over whole rows instead of tiny inner slices.
    """
    w, B, H = window.shape
    return (q.view(B, H // heads, heads) * window.view(w, B, H // heads, heads)).sum(2)


def head_mix(p, window):
    """The entries of window [w, B, H] weighted per head by p [w, B, heads]: [B, H]."""
    w, B, H = window.shape
    return (p[:, :, None] * window.view(w, B, H // p.shape[2], p.shape[2])).sum(0).view(B, H)


def head_outer(p, v):
    """p [w, B, heads] times v [B, H] per head: [w, B, H], the gradient of both above
    with respect to the window."""
    w, B, heads = p.shape
    return (p[:, :, None] * v.view(B, -1, heads)).view(w, B, -1)


class WindowRead(torch.autograd.Function):
    """A read of the window slice [lo, hi) of an EntryBuffer: op "copy" returns the
    slice, "dot" head_dot(x, slice), "mix" head_mix(x, slice). Autograd saves x only,
    never the slice; the backward adds the slice's gradient to the buffer's and returns,
    as the gradient of `new` (the entries first read here), their slots' sums."""

    @staticmethod
    def forward(ctx, op, x, new, buffer, lo, hi):
        ctx.op, ctx.buffer, ctx.span, ctx.new = op, buffer, (lo, hi), len(new)
        ctx.save_for_backward(x)
        window = buffer.data[lo:hi]
        if op == "copy":
            return window.clone()
        return head_dot(x, window, buffer.heads) if op == "dot" else head_mix(x, window)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,), (lo, hi) = ctx.saved_tensors, ctx.span
        window = ctx.buffer.data[lo:hi]
        if ctx.op == "copy":
            grad_x, grad_window = None, grad
        elif ctx.op == "dot":
            grad_x, grad_window = head_mix(grad, window), head_outer(grad, x)
        else:
            grad_x, grad_window = head_dot(grad, window, ctx.buffer.heads), head_outer(x, grad)
        return None, grad_x, ctx.buffer.add_grad(lo, hi, grad_window, ctx.new), None, None, None


class EntryBuffer:
    """The projected entries (keys or values) that one sequence pass puts on a window,
    [n, B, H], stored once each, outside autograd, with room for every step's entries.

    The window at each step is then a slice of it, not a copy. Autograd sees an entry
    only as an input of the first read after it was added (WindowRead): later reads add
    their gradients for it here, and since they depend on that first read, autograd runs
    their backward before its, so the first read returns the whole sum. The buffer holds
    no tensor that autograd tracks: the graph refers to it, so it must not refer back.
    """

    def __init__(self, like, capacity, heads):
        self.data = like.new_empty(capacity, *like.shape[1:])
        self.grad, self.size, self.heads = None, 0, heads

    def read(self, op, x, new, window_size):
        """WindowRead `op` of the last window_size entries, after adding `new`."""
        self.data[self.size:self.size + len(new)] = new.detach()
        self.size += len(new)
        return WindowRead.apply(op, x, new, self, max(0, self.size - window_size), self.size)

    def add_grad(self, lo, hi, grad_window, new):
        """Adds the gradient of slice [lo, hi) and takes (returns and clears) the sums of
        its last `new` slots."""
        if self.grad is None:
            self.grad = torch.zeros_like(self.data)
        self.grad[lo:hi] += grad_window
        taken = self.grad[hi - new:hi].clone()
        self.grad[hi - new:hi] = 0
        return taken


class Window:
    """The FIFO queue of the last k cell values of one sequence pass, with each value's
    keys and values projected once, on the first read after it enters (see the module
    docstring), and kept in EntryBuffers.

    Without positional encoding the attention reads the buffers in place (head_dot and
    head_mix through WindowRead). With it, each step adds the pe term of each entry's
    distance, so it reads a copy of the window and computes on that.
    """

    def __init__(self, cell, cells, steps):
        self.cell = cell
        H = cell.hidden_size
        # Only the cell part of W_k and W_v acts on entries; the pe part acts on distances.
        self.projections = [(layer.weight[:, :H], layer.bias) for layer in (cell.keys, cell.values)]
        if cell.use_positional_encoding:
            # [k, 1, H] each, distances k..1
            self.pe = [(cell.pe @ layer.weight[:, H:].T)[:, None] for layer in (cell.keys, cell.values)]
        self.cells = list(cells.unbind(0))
        self.unread = list(self.cells)
        self.keys, self.values = (EntryBuffer(cells, len(cells) + steps, cell.attention_heads)
                                  for _ in range(2))
        self.moments = None

    @property
    def activate_on_entry(self):
        c = self.cell
        return c.activation_on_keys_and_values and not c.use_positional_encoding

    def project(self, cells):
        kv = [F.linear(cells, weight, bias) for weight, bias in self.projections]
        return [F.elu(x) for x in kv] if self.activate_on_entry else kv

    @staticmethod
    def entry_moments(keys, values):
        """[w, 4, H]: batch mean and variance of each entry's keys, then values."""
        (k_var, k_mean), (v_var, v_mean) = (torch.var_mean(x, 1, correction=0)
                                            for x in (keys, values))
        return torch.stack([k_mean, k_var, v_mean, v_var], dim=1)

    def push(self, c):
        """Add c_t (eq. 8), dropping the oldest entry past k."""
        full = len(self.cells) == self.cell.larnn_window_size
        self.cells = self.cells[full:] + [c]
        self.unread.append(c)

    def read(self, step):
        """(score, mix, keys_affine, values_affine) at `step`: score(q) gives the per-head
        dot products of q with the keys before BN, [w, B, heads] (eqs. 3-4), mix(p) the
        values before BN weighted per head by p, [B, H]; then BN's (scale, shift) for the
        keys and for the values (None without activation_on_keys_and_values)."""
        cell = self.cell
        k, heads = cell.larnn_window_size, cell.attention_heads
        keys, values = self.project(torch.stack(self.unread))
        self.unread = []
        if cell.use_positional_encoding:
            keys = self.keys.read("copy", None, keys, k)
            values = self.values.read("copy", None, values, k)
            w = keys.shape[0]  # a short window takes the most recent distances
            keys, values = keys + self.pe[0][-w:], values + self.pe[1][-w:]
            if cell.activation_on_keys_and_values:
                keys, values = F.elu(keys), F.elu(values)
                moments = self.entry_moments(keys, values)
            score = functools.partial(head_dot, window=keys, heads=heads)
            mix = functools.partial(head_mix, window=values)
        else:
            if cell.activation_on_keys_and_values:
                # An entry's keys and values never change, so its batch moments (for
                # BN_K and BN_V) are taken once, on entry, too.
                moments = self.entry_moments(keys, values)
                if self.moments is not None:
                    moments = torch.cat([self.moments, moments])[-k:]
                self.moments = moments
            score = functools.partial(self.keys.read, "dot", new=keys, window_size=k)
            mix = functools.partial(self.values.read, "mix", new=values, window_size=k)
        if not cell.activation_on_keys_and_values:
            return score, mix, None, None
        count = len(moments) * len(self.cells[0])  # window entries x batch
        return (score, mix,
                window_norm_affine(cell.keys_norm, *window_moments(moments[:, 0], moments[:, 1]),
                                   count, step),
                window_norm_affine(cell.values_norm,
                                   *window_moments(moments[:, 2], moments[:, 3]), count, step))

    def state(self):
        return torch.stack(self.cells)


class LARNNCell(nn.Module):
    """One LARNN layer: `forward` runs one time step, `sequence` a whole sequence.

    State: (h [B, H], c [B, H], window [w, B, H] of the last w <= k cell values, oldest
    first, t: the number of steps run, which picks the BatchNorm running statistics).
    Pass None to start from zeros at t = 0.
    """

    def __init__(self, input_size, hidden_size, attention_heads=1, larnn_window_size=10,
                 larnn_mode="residual", use_positional_encoding=True,
                 activation_on_keys_and_values=True, use_attention=True, dropout=0.0,
                 attention_dropout=0.1, batchnorm_steps=1, cell_norm_placement="recurrence"):
        super().__init__()
        check_config(hidden_size, attention_heads, larnn_window_size, larnn_mode,
                     cell_norm_placement)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.attention_heads, self.larnn_window_size = attention_heads, larnn_window_size
        self.larnn_mode, self.use_attention = larnn_mode, use_attention
        self.use_positional_encoding = use_positional_encoding and use_attention
        self.activation_on_keys_and_values = activation_on_keys_and_values
        self.dropout, self.attention_dropout = dropout, attention_dropout
        self.cell_norm_placement = cell_norm_placement
        I, H = input_size, hidden_size
        attention_size = H if use_attention else 0
        norm = functools.partial(StepBatchNorm, steps=batchnorm_steps)
        if use_attention:
            self.query = nn.Linear(I + H, H)                                # (1)
            pe_size = 0
            if self.use_positional_encoding:
                self.register_buffer("pe", positional_encoding(larnn_window_size),
                                     persistent=False)                      # (2)
                pe_size = self.pe.shape[1]
            self.keys = nn.Linear(H + pe_size, H)                           # (3)
            self.values = nn.Linear(H + pe_size, H)
            if activation_on_keys_and_values:
                self.keys_norm, self.values_norm = norm(H), norm(H)
            self.attention_output = nn.Linear(H, H)                         # (4) W_o
            self.attention_norm = norm(H)                                   # (5)
        if larnn_mode == "residual":                                        # (6)
            self.input_gates = nn.Linear(I, 4 * H)
            self.hidden_gates = nn.Linear(H, 4 * H, bias=False)
            if use_attention:
                self.attention_gates = nn.Linear(H, 4 * H, bias=False)
        else:
            self.gates = nn.Linear(I + H + attention_size, 4 * H)
        self.gates_norm = norm(4 * H)
        self.cell_norm = norm(H)                                            # (8)
        self.hidden_norm = norm(H)
        xavier_init(self)

    def gate_weights(self):
        """(W_x, W_h, W_a, b) of eq. 6. Both modes compute the same function class; they
        differ in parameterisation (one matrix or three) and so in initialisation."""
        if self.larnn_mode == "residual":
            W_a = self.attention_gates.weight if self.use_attention else None
            return (self.input_gates.weight, self.hidden_gates.weight, W_a,
                    self.input_gates.bias)
        W = self.gates.weight
        I, H = self.input_size, self.hidden_size
        W_a = W[:, I + H:] if self.use_attention else None
        return W[:, :I], W[:, I:I + H], W_a, self.gates.bias

    def initial_state(self, inputs):
        zeros = inputs.new_zeros(inputs.shape[1], self.hidden_size)
        return zeros, zeros, zeros[None], 0

    def forward(self, x_t, state=None):
        """One time step: x_t [B, I] -> (h_t [B, H], state)."""
        outputs, state = self.sequence(x_t[None], state)
        return outputs[0], state

    def sequence(self, inputs, state=None):
        """inputs [T, B, I] -> (outputs [T, B, H], state after the last step)."""
        self.check_input(inputs, state)
        fused.threads.fit()  # fewer threads while other processes share the cores
        if fused.applies(inputs):  # the same computation in C++ (fused/), where it runs
            return fused.sequence(self, inputs, state)
        h, c, cells, start = self.initial_state(inputs) if state is None else state
        H = self.hidden_size
        W_x, W_h, W_a, bias = self.gate_weights()
        # Everything that reads only x_t is computed for all steps at once, then
        # unbound: indexing x[t] would cost a zero-filled [T, ...] gradient per step.
        x_gates = F.linear(inputs, W_x, bias).unbind(0)
        if self.use_attention:
            window = Window(self, cells, len(inputs))
            W_qx, W_qh = self.query.weight.split([self.input_size, H], dim=1)
            x_queries = F.linear(inputs, W_qx, self.query.bias).unbind(0)
            W_hidden = torch.cat([W_qh, W_h])  # one product of h_{t-1} serves (1) and (6)
        else:
            window = None
            x_queries = itertools.repeat(None)
        outputs = []
        for t, x_gates_t, x_query_t in zip(itertools.count(start), x_gates, x_queries):
            if window is None:
                z = x_gates_t + F.linear(h, W_h)
            else:
                h_query, h_gates = F.linear(h, W_hidden).split([H, 4 * H], dim=1)
                q = F.elu(x_query_t + h_query)                                    # (1)
                a = self.attend(q, window, t)                                     # (2-5)
                z = x_gates_t + h_gates + F.linear(a, W_a)                        # (6)
            h, c = self.update(z, c, t)                                           # (6-8)
            if window is not None:
                window.push(c)
            outputs.append(h)
        # A BN-LSTM keeps no window; its state holds c alone in the window's place.
        cells = window.state() if window is not None else c[None]
        return torch.stack(outputs), (h, c, cells, start + len(outputs))

    def check_input(self, inputs, state):
        """Clear errors where broadcasting or BatchNorm would give confusing ones."""
        I, H = self.input_size, self.hidden_size
        if inputs.dim() != 3 or inputs.shape[2] != I:
            raise ValueError(f"LARNN input must be time first, [T, B, {I}]; got shape "
                             f"{tuple(inputs.shape)}")
        B = inputs.shape[1]
        if state is not None:
            h, c, cells, _ = state
            if h.shape != (B, H) or c.shape != (B, H) or cells.shape[1:] != (B, H):
                raise ValueError(f"the state (h {tuple(h.shape)}, c {tuple(c.shape)}, window "
                                 f"{tuple(cells.shape)}) is not one for a batch of {B} and "
                                 f"hidden size {H}: pass state=None to start a new batch")
        if self.training and B == 1:
            raise ValueError("a LARNN in training mode normalises each step with the batch's "
                             "statistics, which needs at least 2 samples per batch; got 1 "
                             "(use eval mode, or a larger batch)")

    def attend(self, q, window, t):
        """Eqs. 3-5: multi-head attention of the query over the window."""
        score, mix, keys_affine, values_affine = window.read(t)
        heads = self.attention_heads
        d = self.hidden_size // heads
        if keys_affine is not None:
            q = q * keys_affine[0]  # BN_K's shift only adds a constant per head
        p = F.softmax(score(q) / math.sqrt(d), dim=0)                     # [w, B, heads]
        p = F.dropout(p, self.attention_dropout, self.training)
        read = mix(p)
        if values_affine is not None:
            scale, shift = values_affine
            read = read * scale + (p.sum(0)[:, None] * shift.view(d, heads)).view(read.shape)
        a = self.attention_output(read)
        return self.attention_norm(F.elu(a), t)

    def update(self, z, c, t):
        """Eqs. 6-8: gates, new cell and hidden values at step t."""
        z = self.gates_norm(z, t)
        H = self.hidden_size
        g = torch.tanh(z[:, :H])
        f, i, o = torch.sigmoid(z[:, H:]).chunk(3, dim=1)
        c = g * i + c * f
        c_norm = self.cell_norm(c, t)
        if self.cell_norm_placement == "recurrence":
            c = c_norm  # eq. 8: the normalised value is carried and pushed on the window
        h = self.hidden_norm(o * F.elu(c_norm), t)
        return F.dropout(h, self.dropout, self.training), c


def check_config(hidden_size, attention_heads, larnn_window_size, larnn_mode,
                 cell_norm_placement):
    """One-line errors for configurations the cell cannot build."""
    if larnn_mode not in LARNN_MODES:
        raise ValueError(f"larnn_mode must be one of {LARNN_MODES}, got {larnn_mode!r}")
    if cell_norm_placement not in CELL_NORM_PLACEMENTS:
        raise ValueError(f"cell_norm_placement must be one of {CELL_NORM_PLACEMENTS}, "
                         f"got {cell_norm_placement!r}")
    if attention_heads < 1 or hidden_size % attention_heads:
        nearest = max(1, round(hidden_size / max(attention_heads, 1))) * max(attention_heads, 1)
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of attention_heads "
                         f"({attention_heads}); the nearest valid hidden_size is {nearest}")
    if larnn_window_size < 1:
        raise ValueError(f"larnn_window_size must be >= 1, got {larnn_window_size}")


class LARNN(nn.Module):
    """A stack of LARNN cells over a time-first sequence [T, B, input_size].

    Layer l > 0 reads the output sequence of layer l - 1; with is_stacked_residual each
    layer's output is added to its input (a running sum), which needs
    input_size == hidden_size. forward returns (output [T, B, H], state), the state a
    list of (h, c, window, t) per layer that can be passed back to continue the
    sequence. batchnorm_steps, cell_norm_placement: see the module docstring.
    """

    def __init__(self, input_size, hidden_size, attention_heads, num_layers,
                 larnn_window_size, larnn_mode="residual", use_positional_encoding=True,
                 activation_on_keys_and_values=True, is_stacked_residual=False,
                 dropout=0.0, use_attention=True, attention_dropout=0.1,
                 batchnorm_steps=1, cell_norm_placement="recurrence"):
        super().__init__()
        if is_stacked_residual and input_size != hidden_size:
            raise ValueError(f"is_stacked_residual adds each layer's output to its input, so "
                             f"input_size ({input_size}) must equal hidden_size ({hidden_size})")
        self.is_stacked_residual = is_stacked_residual
        self.layers = nn.ModuleList(
            LARNNCell(input_size if layer == 0 else hidden_size, hidden_size,
                      attention_heads, larnn_window_size, larnn_mode,
                      use_positional_encoding, activation_on_keys_and_values,
                      use_attention, dropout, attention_dropout, batchnorm_steps,
                      cell_norm_placement)
            for layer in range(num_layers))

    def forward(self, inputs, state=None):
        state = [None] * len(self.layers) if state is None else state
        if len(state) != len(self.layers):
            raise ValueError(f"the state has {len(state)} layers, the stack {len(self.layers)}")
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            outputs, layer_state = layer.sequence(inputs, layer_state)
            inputs = inputs + outputs if self.is_stacked_residual else outputs
            new_state.append(layer_state)
        return inputs, new_state


class ActivityClassifier(nn.Module):
    """The paper's classifier: ELU(Linear(I -> H)) per step, a recurrent core, the last
    step's output, Linear(H -> classes). Input [B, T, I] (batch first, as datasets.py
    gives it); returns logits [B, classes].

    model: 'larnn' (the paper), 'bnlstm' (the same stack with attention switched off) or
    'lstm' (torch.nn.LSTM, hidden_size and num_layers from the config, no stacked
    residual). config holds the hyperparameters of the search space (train.py).
    batchnorm_steps: LARNN's, normally the dataset's sequence length.
    """

    def __init__(self, input_size, num_classes, config, model="larnn", batchnorm_steps=1):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        H = config["hidden_size"]
        self.model = model
        self.embed = nn.Linear(input_size, H)
        if model == "lstm":
            self.core = nn.LSTM(H, H, config["num_layers"],
                                dropout=config["dropout"] if config["num_layers"] > 1 else 0.0)
        else:
            self.core = LARNN(H, H, config["attention_heads"], config["num_layers"],
                              config["larnn_window_size"], config["larnn_mode"],
                              config["use_positional_encoding"],
                              config["activation_on_keys_and_values"],
                              config["is_stacked_residual"], config["dropout"],
                              use_attention=model == "larnn",
                              batchnorm_steps=batchnorm_steps,
                              cell_norm_placement=config["cell_norm_placement"])
        self.classify = nn.Linear(H, num_classes)
        xavier_init(self)

    def forward(self, x):
        fused.threads.fit()  # for nn.LSTM too (fused/threads.py)
        x = F.elu(self.embed(x.transpose(0, 1)))
        outputs, _ = self.core(x)
        return self.classify(outputs[-1])


def print_dimensions(T=16, B=4, I=9, H=12, heads=3, num_layers=2, window=5):
    """Shapes and parameter counts of every (positional encoding, stacked residual,
    mode) combination, on a small random batch."""
    x = torch.randn(T, B, I)
    for pe, stacked, mode in itertools.product((False, True), (False, True), LARNN_MODES):
        model = LARNN(H if stacked else I, H, heads, num_layers, window, mode, pe,
                      is_stacked_residual=stacked)
        inputs = torch.randn(T, B, H) if stacked else x
        outputs, state = model(inputs)
        h, c, cells, t = state[-1]
        n = sum(p.numel() for p in model.parameters())
        print(f"pe={pe!s:5} stacked_residual={stacked!s:5} mode={mode:8} "
              f"input {tuple(inputs.shape)} -> output {tuple(outputs.shape)}; "
              f"state per layer: h {tuple(h.shape)}, c {tuple(c.shape)}, "
              f"window {tuple(cells.shape)}, t {t}; {n} parameters")


def print_published_dimensions(B=2):
    """The same for the published UCI HAR classifier (PAPER_CONFIG: T 128, 9 inputs, H 81,
    27 heads, window 38, 3 stacked residual layers, 6 classes)."""
    config, T, I = PAPER_CONFIG, 128, 9
    model = ActivityClassifier(I, 6, config, "larnn", batchnorm_steps=T).eval()
    x = torch.randn(B, T, I)
    with torch.no_grad():
        embedded = F.elu(model.embed(x.transpose(0, 1)))
        outputs, state = model.core(embedded)
        logits = model.classify(outputs[-1])
    h, c, cells, t = state[-1]
    count = sum(p.numel() for p in model.parameters())
    core = sum(p.numel() for p in model.core.parameters())
    heads = config["attention_heads"]
    print(f"published UCI HAR classifier: input {tuple(x.shape)} (batch first) -> embedded "
          f"{tuple(embedded.shape)} (time first) -> {len(model.core.layers)} LARNN layers, "
          f"{heads} heads of {config['hidden_size'] // heads} features, window "
          f"{config['larnn_window_size']} -> output {tuple(outputs.shape)}; state per "
          f"layer: h {tuple(h.shape)}, c {tuple(c.shape)}, window {tuple(cells.shape)}, t {t} "
          f"-> logits {tuple(logits.shape)}; {count} parameters ({core} in the LARNN stack)")


if __name__ == "__main__":
    # The shapes are the same on both paths; the PyTorch one needs no build of the fused
    # layer (half a minute on a machine's first run), so this prints in a few seconds.
    os.environ.setdefault("LARNN_BACKEND", "pytorch")
    print_dimensions()
    print_published_dimensions()
