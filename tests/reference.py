"""An independent, loop-based forward pass used as the oracle in tests.

It shares no code with the backends: convolutions use ``torch.nn.functional.conv2d`` and the
locally connected layer is a Python loop over output positions.
"""

import torch
import torch.nn.functional as F

from agrel_sim import Conv2d, Dense, Dropout, LocallyConnected2d


def reference_q(description, weights, x, keeps):
    """Q-values of ``x`` for ``weights`` (a dict as ``TorchNetwork.weights()``).

    ``keeps`` maps a dropout layer's index to its boolean keep mask (from recorded gates).
    """
    y = x
    for index, spec in enumerate(description.layers):
        name = f"layers.{index}"
        bias = weights.get(f"{name}.bias")
        if isinstance(spec, Dense):
            y = F.relu(F.linear(y.flatten(1), weights[f"{name}.ff"], bias))
        elif isinstance(spec, Conv2d):
            y = F.relu(F.conv2d(y, weights[f"{name}.ff"], bias, stride=spec.stride, padding=spec.padding))
        elif isinstance(spec, LocallyConnected2d):
            y = F.relu(_local_by_loops(y, weights[f"{name}.ff"], bias, spec))
        elif isinstance(spec, Dropout):
            y = y * keeps[index] / (1 - spec.rate)
    return F.linear(y.flatten(1), weights["output.ff"], weights.get("output.bias"))


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
