"""A plain, slow LARNN that follows the paper's equations line by line.

At every step it rebuilds the window, concatenates the positional encoding, projects
every entry to keys and values and normalises them with the BatchNorm modules as they
are. It reads the parameters of a production `larnn.LARNNCell` (a deep copy of it, so
that both keep their own BatchNorm running statistics), and exists only to check the
fast implementation.
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
            p = torch.softmax(torch.einsum("bdh,wbdh->bhw", q, K) / math.sqrt(d), -1)
            p = F.dropout(p, m.attention_dropout, m.training)              # (4)
            a = m.attention_output(torch.einsum("bhw,wbdh->bdh", p, V).reshape(B, H))
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
