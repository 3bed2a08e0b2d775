"""An independent forward pass used as the oracle in tests.

It shares no code with the backends: convolutions use ``torch.nn.functional.conv2d`` and the
locally connected layer is a Python loop over output positions.
"""

import torch
import torch.nn.functional as F

from agrel_sim import Conv2d, Dense, Dropout, LocallyConnected2d


def reference_q(description, weights, x, keeps, through_feedback=False):
    """Q-values of ``x`` for ``weights`` (a dict as ``TorchNetwork.weights()``).

    ``keeps`` maps a dropout layer's index to its boolean keep mask (from recorded gates).

    With ``through_feedback`` the values are computed with the ff weights W, but gradients flow
    back through the fb weights W′, as DeepAGREL's feedback pass does: each layer's drive is
    ``drive(W′) + (drive(W) - drive(W′)).detach()``, whose value is ``drive(W)`` and whose
    gradient, to the fb weights, the bias and the layer below, is that of ``drive(W′)``.
    """
    y = x
    for index, spec in enumerate(description.layers):
        if isinstance(spec, Dropout):
            y = y * keeps[index] / (1 - spec.rate)
        else:
            y = F.relu(_drive(spec, y, weights, f"layers.{index}", through_feedback))
    return _drive(Dense(description.n_actions), y, weights, "output", through_feedback)


def _drive(spec, y, weights, name, through_feedback):
    bias = weights.get(f"{name}.bias")
    drive = _drive_with(spec, y, weights[f"{name}.ff"], bias)
    if not through_feedback:
        return drive
    feedback_path = _drive_with(spec, y, weights[f"{name}.fb"], bias)
    return feedback_path + (drive - feedback_path).detach()


def _drive_with(spec, y, weight, bias):
    if isinstance(spec, Dense):
        return F.linear(y.flatten(1), weight, bias)
    if isinstance(spec, Conv2d):
        return F.conv2d(y, weight, bias, stride=spec.stride, padding=spec.padding)
    assert isinstance(spec, LocallyConnected2d), spec
    return _local_by_loops(y, weight, bias, spec)


def _local_by_loops(y, ff, bias, spec):
    k, s = spec.kernel_size, spec.stride
    y = F.pad(y, [spec.padding] * 4)
    out_h = (y.shape[2] - k) // s + 1
    out_w = (y.shape[3] - k) // s + 1
    rows = []
    for i in range(out_h):
        row = []
        for j in range(out_w):
            patch = y[:, :, i * s:i * s + k, j * s:j * s + k].reshape(y.shape[0], -1)
            row.append(patch @ ff[i * out_w + j].T)
        rows.append(torch.stack(row, dim=-1))
    drive = torch.stack(rows, dim=-2)
    return drive if bias is None else drive + bias
