"""A plain, slow LARNN that follows the paper's equations line by line.

At every step it rebuilds the window, concatenates the positional encoding, projects
every entry to keys and values and normalises them with the BatchNorm modules as they
are. It reads the parameters of a production `larnn.LARNNCell` (a deep copy of it, so
that both keep their own BatchNorm running statistics), and exists only to check the
fast implementation. reference_classifier and reference_lstm do the same for the
paper's classifier around it and for the torch.nn.LSTM baseline.
"""
import math

import torch
import torch.nn.functional as F


def reference_cell(m, inputs, state=None):
    """inputs [T, B, I] through the LARNNCell `m`, recomputing everything per step."""
    T, B, _ = inputs.shape
    H, heads = m.hidden_size, m.attention_heads
    d = H // heads
    if state is None:
        h = c = inputs.new_zeros(B, H)
        queue, start = [c], 0
    else:
        h, c, cells, start = state
        queue = list(cells.unbind(0))
    outputs = []
    for t, x in enumerate(inputs.unbind(0), start):
        if m.use_attention:
            q = F.elu(m.query(torch.cat([x, h], 1)))                       # (1)
            C = torch.stack(queue)                                         # [w, B, H]
            w = C.shape[0]
            if m.use_positional_encoding:                                  # (2)
                pe = m.pe[-w:]
                C = torch.cat([C, pe[:, None, :].expand(w, B, pe.shape[1])], 2)
            K, V = m.keys(C), m.values(C)                                  # (3)
            if m.activation_on_keys_and_values:
                K = m.keys_norm(F.elu(K).reshape(w * B, H), t).reshape(w, B, H)
                V = m.values_norm(F.elu(V).reshape(w * B, H), t).reshape(w, B, H)
            # Head i holds the features f with f % heads == i (see LARNNCell.attend).
            q, K, V = q.view(B, d, heads), K.view(w, B, d, heads), V.view(w, B, d, heads)
            # p [w, B, heads], softmax over the window: the layout of larnn.py, so that
            # the tests can hand this the attention dropout masks the model drew.
            p = torch.softmax(torch.einsum("bdh,wbdh->wbh", q, K) / math.sqrt(d), 0)
            p = F.dropout(p, m.attention_dropout, m.training)              # (4)
            a = m.attention_output(torch.einsum("wbh,wbdh->bdh", p, V).reshape(B, H))
            a = m.attention_norm(F.elu(a), t)                              # (5)
        if m.larnn_mode == "residual":                                     # (6)
            z = m.input_gates(x) + m.hidden_gates(h)
            if m.use_attention:
                z = z + m.attention_gates(a)
        else:
            z = m.gates(torch.cat([x, h, a] if m.use_attention else [x, h], 1))
        z = m.gates_norm(z, t)
        z1, z2, z3, z4 = z.chunk(4, 1)                                     # (7)
        g, f, i, o = torch.tanh(z1), torch.sigmoid(z2), torch.sigmoid(z3), torch.sigmoid(z4)
        if m.cell_norm_placement == "recurrence":
            c = m.cell_norm(g * i + c * f, t)                              # (8)
            h = F.dropout(m.hidden_norm(o * F.elu(c), t), m.dropout, m.training)
        else:
            c = g * i + c * f
            h = F.dropout(m.hidden_norm(o * F.elu(m.cell_norm(c, t)), t), m.dropout,
                          m.training)
        queue = (queue + [c])[-m.larnn_window_size:]
        outputs.append(h)
    return torch.stack(outputs), (h, c, torch.stack(queue), start + T)


def reference_stack(model, inputs):
    """A larnn.LARNN stack, layer by layer through reference_cell."""
    for layer in model.layers:
        outputs, _ = reference_cell(layer, inputs)
        inputs = inputs + outputs if model.is_stacked_residual else outputs
    return inputs


def reference_lstm(lstm, inputs):
    """torch.nn.LSTM's equations (gates i, f, g, o), layer by layer, without dropout."""
    for layer in range(lstm.num_layers):
        W_ih, W_hh, b_ih, b_hh = (getattr(lstm, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        h = c = inputs.new_zeros(inputs.shape[1], lstm.hidden_size)
        outputs = []
        for x in inputs.unbind(0):
            i, f, g, o = (x @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        inputs = torch.stack(outputs)
    return inputs


def reference_classifier(model, x):
    """A larnn.ActivityClassifier: x [B, T, I] -> ELU(W_e x_t + b_e) per step, the
    recurrent core over time, W_y h_T + b_y of the last step: logits [B, classes]."""
    embedded = F.elu(x @ model.embed.weight.T + model.embed.bias).transpose(0, 1)
    core = reference_lstm if model.model == "lstm" else reference_stack
    return core(model.core, embedded)[-1] @ model.classify.weight.T + model.classify.bias
