"""The vectorised PyTorch backend: batches of trials on the CPU or a GPU.

DeepAGREL is written out explicitly, one layer kind at a time, as batched tensor operations: the
forward pass, the feedback pass through the fb weights gated by each column's ff activity, and
the four-factor update ``dW = alpha * delta * y_pre * gate * fb`` (averaged over the batch).
Autograd is used only by the error-backpropagation baseline (``rule.name = "ebp"``).

Weight layouts (``ff`` and ``fb`` always have the same shape; ``fb[q, m]`` is the synapse from
the feedback neuron of upper column ``q`` to the feedback neuron of lower column ``m``, so
strict reciprocity reads ``fb == ff``, i.e. the feedback matrix is ffᵀ):

- dense: ``(units, inputs)``, as :func:`torch.nn.functional.linear`;
- conv: ``(channels, in_channels, k, k)``, as :func:`torch.nn.functional.conv2d`;
- locally connected: ``(positions, channels, in_channels * k * k)``, one kernel per output
  position (row-major over the output sheet), flattened as :func:`torch.nn.functional.unfold`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agrel_sim import rule as agrel
from agrel_sim.backends import LEARNING_RATE, DropoutLayer, check_batch, check_device, check_representable, check_seed, check_weights_to_load, weights_to_set
from agrel_sim.network import ColumnNetwork, Conv2d, Dense, Dropout, LocallyConnected2d


# ---------------------------------------------------------------------------------------------
# The maths of each layer kind: ff drive, feedback through the fb weights, weight change.
# ``gfb`` is the gated feedback of the upper columns (gate * fb); ``dgfb`` is the same scaled per
# trial by alpha * delta / B, so that the weight change is a plain correlation with ``y_prev``.

def dense_drive(y_prev, ff, bias):
    """The ff drive ``(B, units)`` of dense columns: ``ff @ y_prev (+ bias)``, the input flattened.

    Parameters
    ----------
    y_prev : Tensor (B, *input_shape)
        The ff activity of the columns below; flattened to ``(B, inputs)``.
    ff : Tensor (units, inputs)
        The feedforward weights.
    bias : Tensor (units,) or None
        The columns' biases; None where the rule has none.

    Returns
    -------
    Tensor (B, units)
        The drive ``a`` of each column, not yet rectified.
    """
    return F.linear(y_prev.flatten(1), ff, bias)


def dense_feedback(gfb, fb, input_shape):
    """The feedback ``gfb @ fb`` that reaches each lower column, in the layout ``(B, *input_shape)``.

    Parameters
    ----------
    gfb : Tensor (B, units)
        The gated feedback (gate * fb) of the dense columns.
    fb : Tensor (units, inputs)
        The feedback weights, ``fb[q, m]`` from upper column ``q`` to lower column ``m``.
    input_shape : tuple of int
        The shape of the population of lower columns, without the batch axis.

    Returns
    -------
    Tensor (B, *input_shape)
        The input of each lower column's feedback neuron, before that column's gate.
    """
    return (gfb @ fb).view(-1, *input_shape)


def dense_weight_change(y_prev, dgfb):
    """The change of the ``(units, inputs)`` weights: ``dgfb`` correlated with ``y_prev``, summed over the batch.

    Parameters
    ----------
    y_prev : Tensor (B, *input_shape)
        The presynaptic ff activity of the columns below; flattened to ``(B, inputs)``.
    dgfb : Tensor (B, units)
        The gated feedback of the dense columns, scaled per trial by ``alpha * delta / B``.

    Returns
    -------
    Tensor (units, inputs)
        The four-factor weight change, averaged over the batch (the ``1 / B`` is in ``dgfb``).
    """
    return dgfb.T @ y_prev.flatten(1)


def conv_drive(y_prev, ff, bias, stride, padding):
    """The ff drive ``(B, channels, H, W)`` of a sheet of columns sharing the kernel ``ff``.

    Parameters
    ----------
    y_prev : Tensor (B, in_channels, H_in, W_in)
        The ff activity of the sheet below.
    ff : Tensor (channels, in_channels, k, k)
        The shared feedforward kernels.
    bias : Tensor (channels,) or None
        One bias per channel; None where the rule has none.
    stride : int
        Step between windows.
    padding : int
        Rows and columns of zeros added on every side of the sheet below.

    Returns
    -------
    Tensor (B, channels, H, W)
        The drive ``a`` of each column, not yet rectified.
    """
    return F.conv2d(y_prev, ff, bias, stride=stride, padding=padding)


def conv_feedback(gfb, fb, stride, padding, output_padding):
    """The feedback that reaches each lower column: the transposed convolution of ``gfb`` with
    the fb kernel, so that each collects fb from every upper column whose kernel covers it.

    Parameters
    ----------
    gfb : Tensor (B, channels, H, W)
        The gated feedback (gate * fb) of the upper sheet.
    fb : Tensor (channels, in_channels, k, k)
        The feedback kernels, in the layout of the ff kernels.
    stride : int
        Step between windows, as in the forward pass.
    padding : int
        Padding of the sheet below, as in the forward pass.
    output_padding : tuple of int
        Rows and columns at the bottom and right of the sheet below that no window reaches
        (they get zero feedback), so that the result has the lower sheet's size.

    Returns
    -------
    Tensor (B, in_channels, H_in, W_in)
        The input of each lower column's feedback neuron, before that column's gate.
    """
    return F.conv_transpose2d(gfb, fb, stride=stride, padding=padding, output_padding=output_padding)


def conv_weight_change(y_prev, dgfb, weight_shape, stride, padding):
    """The shared kernel's change: the four-factor product summed over all positions and the batch.

    Parameters
    ----------
    y_prev : Tensor (B, in_channels, H_in, W_in)
        The presynaptic ff activity of the sheet below.
    dgfb : Tensor (B, channels, H, W)
        The gated feedback of the upper sheet, scaled per trial by ``alpha * delta / B``.
    weight_shape : torch.Size or tuple of int
        The kernels' shape, ``(channels, in_channels, k, k)``.
    stride : int
        Step between windows, as in the forward pass.
    padding : int
        Padding of the sheet below, as in the forward pass.

    Returns
    -------
    Tensor of shape ``weight_shape``
        The change of the shared ff (and fb) kernels.
    """
    return torch.nn.grad.conv2d_weight(y_prev, weight_shape, dgfb, stride=stride, padding=padding)


def local_drive(patches, ff):
    """The ff drive ``(B, channels, positions)`` of a locally connected sheet, from unfolded ``patches``.

    Parameters
    ----------
    patches : Tensor (B, in_channels * k * k, positions)
        The windows of the sheet below, as :func:`torch.nn.functional.unfold` gives them.
    ff : Tensor (positions, channels, in_channels * k * k)
        One feedforward kernel per output position.

    Returns
    -------
    Tensor (B, channels, positions)
        The drive ``a`` of each column, without bias and not yet rectified.
    """
    return torch.einsum("bkl,lok->bol", patches, ff)


def local_feedback(gfb, fb, input_size, kernel_size, stride, padding):
    """The feedback that reaches each lower column: every position's ``gfb`` through its own fb
    kernel, the overlapping patches summed back onto the ``input_size`` sheet.

    Parameters
    ----------
    gfb : Tensor (B, channels, positions)
        The gated feedback (gate * fb) of the upper sheet, positions flattened row-major.
    fb : Tensor (positions, channels, in_channels * k * k)
        One feedback kernel per position, in the layout of the ff kernels.
    input_size : tuple of int
        ``(H_in, W_in)``, the size of the sheet below.
    kernel_size : int
        Side ``k`` of the square window.
    stride : int
        Step between windows, as in the forward pass.
    padding : int
        Padding of the sheet below, as in the forward pass.

    Returns
    -------
    Tensor (B, in_channels, H_in, W_in)
        The input of each lower column's feedback neuron, before that column's gate.
    """
    patches = torch.einsum("bol,lok->bkl", gfb, fb)
    return F.fold(patches, input_size, kernel_size, stride=stride, padding=padding)


def local_weight_change(patches, dgfb):
    """The change of every position's kernel: ``dgfb`` correlated with its patch, summed over the batch.

    Parameters
    ----------
    patches : Tensor (B, in_channels * k * k, positions)
        The unfolded windows of the sheet below (presynaptic ff activity).
    dgfb : Tensor (B, channels, positions)
        The gated feedback of the upper sheet, scaled per trial by ``alpha * delta / B``.

    Returns
    -------
    Tensor (positions, channels, in_channels * k * k)
        The change of each position's ff (and fb) kernel.
    """
    return torch.einsum("bol,bkl->lok", dgfb, patches)


# ---------------------------------------------------------------------------------------------
# Weights handed out for reading.

# Special methods that write into their tensor (``w[i] = x``, ``w += x``, ``w.data = x``).
IN_PLACE_SPECIAL_METHODS = frozenset({
    "__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__imatmul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
})
# Methods named like in-place operations that change no values.
NOT_WRITING = frozenset({"requires_grad_", "share_memory_"})


class ReadOnlyWeights(torch.Tensor):
    """Weights as a layer hands them out (``layer.ff``, ``layer.fb``, ``layer.bias``): read-only.

    The Brian2 backend hands out a copy of its synapses' weights, so that a write into it would
    be lost without a word; on every backend, therefore, a write into these tensors raises
    (``w[1] = 0``, ``w.mul_(0)``, ``w += 1``, ``out=w``, ``inplace=True``,
    ``torch.nn.init.uniform_(w)``, ``torch._foreach_mul_([w], 0)``) with a
    ``RuntimeError`` (not a ``TypeError``, which torch would turn into ``w = w + 1``), and
    weights are set by assigning a whole tensor: ``layer.ff = new``. What shares their memory (a
    view such as ``w[1]`` or ``w.T``, ``w.numpy()``) is read-only too; new tensors
    (``w.clone()``, ``w * 2``, a copy or deep copy, what ``torch.save`` stores, what DLPack
    exports) are plain. This guards against mistakes, not intent: a plain tensor made on the same
    memory (``w.as_subclass(torch.Tensor)``, ``torch.from_numpy(w.numpy())``, ``w.untyped_storage()``)
    writes into the live weights of the torch backend.

    Attributes
    ----------
    weight_name : str
        ``"<layer>.ff"``, ``"<layer>.fb"`` or ``"<layer>.bias"``, for the error message.
    """

    weight_name: str

    @classmethod
    def of(cls, tensor: torch.Tensor, weight_name: str) -> ReadOnlyWeights:
        """A read-only tensor that shares ``tensor``'s memory (detached from autograd).

        Parameters
        ----------
        tensor : torch.Tensor
            The weights to hand out.
        weight_name : str
            ``"<layer>.ff"``, ``"<layer>.fb"`` or ``"<layer>.bias"``, for the error message.

        Returns
        -------
        ReadOnlyWeights
            A view of ``tensor`` whose in-place writes raise ``RuntimeError``.
        """
        weights = tensor.detach().as_subclass(cls)
        weights.weight_name = weight_name
        return weights

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        written = [kwargs.get("out")]
        in_place = name in IN_PLACE_SPECIAL_METHODS or (name.endswith("_") and not name.endswith("__") and name not in NOT_WRITING)
        if in_place or kwargs.get("inplace"):
            # What an in-place function writes is its first argument, given by position
            # (``w.mul_(0)``) or by keyword (torch.nn.init passes ``tensor=w``), or each tensor
            # of a list there (``torch._foreach_mul_([w], 0)``); the other arguments it reads.
            written.append(args[0] if args else next(iter(kwargs.values()), None))
        written = [item for target in written for item in (target if isinstance(target, (tuple, list)) else [target])]
        for target in written:
            if isinstance(target, cls):
                part = target.weight_name.rpartition(".")[2]
                raise RuntimeError(
                    f"{target.weight_name}: weights read from a layer are read-only (the brian2 backend hands out a "
                    f"copy, where an in-place write would be lost); set them by assigning a whole tensor: "
                    f"w = layer.{part}.clone(); w[...] = ...; layer.{part} = w"
                )
        sources = [a for a in (*args, *kwargs.values()) if isinstance(a, cls)]
        with torch._C.DisableTorchFunctionSubclass():
            return _read_only_where_shared(func(*args, **kwargs), sources)

    def __copy__(self):
        return self.clone()

    def __deepcopy__(self, memo):
        return self.clone()

    def __dlpack__(self, *args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():  # a consumer may write into what it receives
            return self.clone().__dlpack__(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _read_only_where_shared(value, sources: list[ReadOnlyWeights]):
    """``value`` (a result computed from ``sources``), read-only where it shares their memory."""
    if any(value is source for source in sources):  # a method that returns its tensor (requires_grad_)
        return value
    if isinstance(value, torch.Tensor):
        for source in sources:
            if value.layout == torch.strided and value.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                return ReadOnlyWeights.of(value, source.weight_name)
        return value.as_subclass(torch.Tensor) if isinstance(value, ReadOnlyWeights) else value
    if isinstance(value, np.ndarray):  # w.numpy(), np.asarray(w): the tensor's memory, unless copied
        for source in sources:
            storage = source.untyped_storage()
            if source.device.type == "cpu" and storage.data_ptr() <= value.ctypes.data < storage.data_ptr() + storage.nbytes():
                value.flags.writeable = False
    elif type(value) is tuple:  # w.unbind(), w.split(...): views
        return tuple(_read_only_where_shared(item, sources) for item in value)
    return value


# ---------------------------------------------------------------------------------------------
# Thin classes that hold the tensors of one population of columns.

@dataclass
class LayerActivity:
    """What one layer's columns did in a batch of trials (each tensor has a leading batch axis).

    ``ff``: activity ``y`` of the feedforward neurons; ``fb``: activity of the feedback neurons,
    whose input the column's gate multiplies (so a silent column's fb neuron is silent too;
    ``None`` for EBP, which has no feedback neurons); ``gate``: whether each column's gate was
    open (ff neuron active and not dropped by a dropout layer above). A dropout layer's record
    shows the columns below it: its ``ff`` is their activity after dropout (the survivors scaled
    by ``1 / (1 - rate)``), its ``gate`` and ``fb`` are theirs. ``changed``: the fraction of the layer's
    ff synapses whose four-factor update in this batch is not zero (for EBP: whose gradient is
    not zero; an update smaller than a float32 weight's rounding step is counted, though it
    leaves the weight as it was); weight decay, which shrinks every weight, is not counted (0-dim tensor; ``None``
    without weights or learning; see :func:`changed_fraction`).

    Parameters
    ----------
    name : str
        The layer's name, ``"layers.N"`` or ``"output"``.
    ff : Tensor (B, *shape)
        Activity ``y`` of the feedforward neurons (``shape``: the layer's columns).
    fb : Tensor (B, *shape) or None
        Activity of the feedback neurons, gated; None for EBP.
    gate : Tensor of bool (B, *shape)
        Whether each column's gate was open.
    changed : Tensor () or None
        The fraction of the layer's ff synapses changed by this batch.
    """

    name: str
    ff: torch.Tensor
    fb: torch.Tensor | None
    gate: torch.Tensor
    changed: torch.Tensor | None = None


@dataclass
class Trials:
    """The outcome of a batch of B trials.

    Parameters
    ----------
    q : Tensor (B, L)
        Q-values (for ``ebp``: the logits of the softmax).
    action : Tensor (B,)
        The selected action (for ``ebp``: the greedy one).
    reward : Tensor (B,)
        The reward ``r`` of each trial: ``reward_correct`` when the action was the label, else
        ``reward_wrong``.
    delta : Tensor (B,) or None
        The reward-prediction error ``r - q_s`` (DeepAGREL only).
    loss : Tensor () or None
        Mean cross-entropy of the batch (EBP only).
    layers : list of LayerActivity or None
        Per-layer activity, bottom to top, the output last; only when asked for.
    """

    q: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    delta: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    layers: list[LayerActivity] | None = None


class _Layer:
    """Common parts: weights, their read/set access, the four-factor update."""

    name: str
    has_weights = True

    def __init__(self, name, input_shape, output_shape, weight_shape, bias_shape, net):
        self.name = name
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        rule = net.description.rule
        self._ff = net.uniform(weight_shape)
        if rule.name == "ebp" or rule.feedback == "tied":
            self._fb = self._ff
        elif rule.feedback == "reciprocal":
            self._fb = self._ff.clone()
        else:  # independent: drawn once every ff tensor is (TorchNetwork), so ff is the same in every mode
            self._fb = None
        self._bias = torch.zeros(bias_shape, device=net.device, dtype=net.dtype) if rule.bias else None
        self.saved = None  # what the forward pass keeps for the feedback and plasticity phases

    @property
    def ff(self) -> ReadOnlyWeights:
        """Feedforward weights: a read-only view of the weights the layer learns with, which
        later learning changes (clone it to keep a snapshot); assign a tensor to set them."""
        return ReadOnlyWeights.of(self._ff, f"{self.name}.ff")

    @ff.setter
    def ff(self, value):
        _copy_into(self._ff, value, f"{self.name}.ff")

    @property
    def fb(self) -> ReadOnlyWeights:
        """Feedback weights, read as :attr:`ff`; in ``tied`` mode, and always for rule ``ebp``,
        the same weights as ``ff`` (setting either sets both)."""
        return ReadOnlyWeights.of(self._fb, f"{self.name}.fb")

    @fb.setter
    def fb(self, value):
        _copy_into(self._fb, value, f"{self.name}.fb")

    @property
    def bias(self) -> ReadOnlyWeights | None:
        """The columns' biases, read as :attr:`ff`, or None when the rule has none."""
        return None if self._bias is None else ReadOnlyWeights.of(self._bias, f"{self.name}.bias")

    @bias.setter
    def bias(self, value):
        if self._bias is None:
            raise ValueError(f"{self.name}.bias: this network has no biases (rule.bias = false)")
        _copy_into(self._bias, value, f"{self.name}.bias")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layer's own weight tensors by kind (``ff``; ``fb`` when not tied; ``bias``), as stored."""
        named = {"ff": self._ff}
        if self._fb is not self._ff:
            named["fb"] = self._fb
        if self._bias is not None:
            named["bias"] = self._bias
        return named

    def gate(self, y):
        """Where the columns' gates are open, given their ff activity ``y``: a ReLU column is on."""
        return y > 0

    def gate_feedback(self, fb, y):
        """The feedback ``fb`` arriving at the columns, times their gates."""
        return fb * (y > 0).to(fb.dtype)

    def learn(self, y_prev, dgfb, decay):
        """Apply the four-factor change (and weight decay) to ff, fb and bias; return the change."""
        change = self.weight_change(y_prev, dgfb)
        for weights in {id(t): t for t in (self._ff, self._fb)}.values():
            if decay:
                weights.add_(weights, alpha=-decay)
            weights.add_(change)
        if self._bias is not None:
            if decay:
                self._bias.add_(self._bias, alpha=-decay)
            self._bias.add_(self.bias_change(dgfb))
        return change


class DenseColumns(_Layer):
    """Columns connected to every column below; the output Q-units are one of these, linear.

    Parameters
    ----------
    name : str
        ``"layers.N"`` or ``"output"``, for weights' names and messages.
    spec : Dense
        The layer's description.
    input_shape : tuple of int
        The shape of the population of columns below; a sheet is flattened.
    net : TorchNetwork
        The network being built: it draws the weights and gives the rule, device and dtype.
    linear : bool, default False
        Linear columns (the output Q-units): no rectification, gates always open.
    """

    def __init__(self, name, spec: Dense, input_shape, net, linear=False):
        fan_in = math.prod(input_shape)
        super().__init__(name, input_shape, (spec.units,), (spec.units, fan_in), (spec.units,), net)
        self.linear = linear

    def forward(self, y_prev, learning):
        """The columns' ff activity (the output's linear drive), keeping ``y_prev`` for learning.

        Parameters
        ----------
        y_prev : Tensor (B, *input_shape)
            The ff activity of the columns below.
        learning : bool
            Whether the trials learn; not used here (dropout layers use it).

        Returns
        -------
        Tensor (B, units)
            The activity ``y`` (for the output, the Q-values).
        """
        self.saved = y_prev
        drive = dense_drive(y_prev, self._ff, self._bias)
        return drive if self.linear else drive.relu_()

    def gate(self, y):
        """Where the columns' gates are open: where ``y > 0``, everywhere for linear columns.

        Parameters
        ----------
        y : Tensor (B, units)
            The columns' ff activity.

        Returns
        -------
        Tensor of bool (B, units)
            True where the gate is open.
        """
        return torch.ones_like(y, dtype=torch.bool) if self.linear else y > 0

    def gate_feedback(self, fb, y):
        """The feedback ``fb`` arriving at the columns, times their gates (unchanged for linear columns).

        Parameters
        ----------
        fb : Tensor (B, units)
            The feedback arriving at the columns (for the output, the one-hot ``z`` of the
            selected action).
        y : Tensor (B, units)
            The columns' ff activity, which sets the gates.

        Returns
        -------
        Tensor (B, units)
            The gated feedback ``gfb``.
        """
        return fb if self.linear else super().gate_feedback(fb, y)

    def feedback(self, gfb):
        """The feedback that the gated feedback ``gfb`` of these columns sends to the layer below.

        Parameters
        ----------
        gfb : Tensor (B, units)
            The gated feedback of these columns.

        Returns
        -------
        Tensor (B, *input_shape)
            The feedback reaching each column below, before its gate.
        """
        return dense_feedback(gfb, self._fb, self.input_shape)

    def weight_change(self, y_prev, dgfb):
        """The change of the ff (and fb) weights; see :func:`dense_weight_change`.

        Parameters
        ----------
        y_prev : Tensor (B, *input_shape)
            The activity of the columns below, as :meth:`forward` saved it.
        dgfb : Tensor (B, units)
            The gated feedback, scaled per trial by ``alpha * delta / B``.

        Returns
        -------
        Tensor (units, inputs)
            The weight change.
        """
        return dense_weight_change(y_prev, dgfb)

    def bias_change(self, dgfb):
        """The change of the biases: the gated, RPE-scaled feedback ``dgfb`` summed over trials.

        Parameters
        ----------
        dgfb : Tensor (B, units)
            The gated feedback, scaled per trial by ``alpha * delta / B``.

        Returns
        -------
        Tensor (units,)
            The bias change.
        """
        return dgfb.sum(0)


class ConvColumns(_Layer):
    """A sheet of columns sharing one kernel per channel.

    Parameters
    ----------
    name : str
        ``"layers.N"``, for weights' names and messages.
    spec : Conv2d
        The layer's description.
    input_shape : tuple of int
        ``(in_channels, H_in, W_in)``, the sheet below.
    output_shape : tuple of int
        ``(channels, H, W)``, this sheet (as :meth:`ColumnNetwork.layer_shapes` gives it).
    net : TorchNetwork
        The network being built: it draws the weights and gives the rule, device and dtype.
    """

    def __init__(self, name, spec: Conv2d, input_shape, output_shape, net):
        k = spec.kernel_size
        super().__init__(name, input_shape, output_shape, (spec.channels, input_shape[0], k, k), (spec.channels,), net)
        self.stride, self.padding = spec.stride, spec.padding
        # Rows/columns of the input that the strided kernel never reaches still get (zero) feedback.
        self.output_padding = tuple(
            size - ((out - 1) * spec.stride - 2 * spec.padding + k)
            for size, out in zip(input_shape[1:], output_shape[1:])
        )

    def forward(self, y_prev, learning):
        """The columns' ff activity, keeping ``y_prev`` for learning.

        Parameters
        ----------
        y_prev : Tensor (B, in_channels, H_in, W_in)
            The ff activity of the sheet below.
        learning : bool
            Whether the trials learn; not used here (dropout layers use it).

        Returns
        -------
        Tensor (B, channels, H, W)
            The rectified activity ``y``.
        """
        self.saved = y_prev
        return conv_drive(y_prev, self._ff, self._bias, self.stride, self.padding).relu_()

    def feedback(self, gfb):
        """The feedback that the gated feedback ``gfb`` of these columns sends to the layer below.

        Parameters
        ----------
        gfb : Tensor (B, channels, H, W)
            The gated feedback of these columns.

        Returns
        -------
        Tensor (B, in_channels, H_in, W_in)
            The feedback reaching each column below, before its gate.
        """
        return conv_feedback(gfb, self._fb, self.stride, self.padding, self.output_padding)

    def weight_change(self, y_prev, dgfb):
        """The change of the ff (and fb) kernels; see :func:`conv_weight_change`.

        Parameters
        ----------
        y_prev : Tensor (B, in_channels, H_in, W_in)
            The activity of the sheet below, as :meth:`forward` saved it.
        dgfb : Tensor (B, channels, H, W)
            The gated feedback, scaled per trial by ``alpha * delta / B``.

        Returns
        -------
        Tensor (channels, in_channels, k, k)
            The kernel change.
        """
        return conv_weight_change(y_prev, dgfb, self._ff.shape, self.stride, self.padding)

    def bias_change(self, dgfb):
        """The change of the biases, one per channel: ``dgfb`` summed over trials and positions.

        Parameters
        ----------
        dgfb : Tensor (B, channels, H, W)
            The gated feedback, scaled per trial by ``alpha * delta / B``.

        Returns
        -------
        Tensor (channels,)
            The bias change.
        """
        return dgfb.sum((0, 2, 3))


class LocallyConnectedColumns(_Layer):
    """A sheet with the geometry of a convolution and a kernel of its own at every position.

    Parameters
    ----------
    name : str
        ``"layers.N"``, for weights' names and messages.
    spec : LocallyConnected2d
        The layer's description.
    input_shape : tuple of int
        ``(in_channels, H_in, W_in)``, the sheet below.
    output_shape : tuple of int
        ``(channels, H, W)``, this sheet (as :meth:`ColumnNetwork.layer_shapes` gives it).
    net : TorchNetwork
        The network being built: it draws the weights and gives the rule, device and dtype.
    """

    def __init__(self, name, spec: LocallyConnected2d, input_shape, output_shape, net):
        k = spec.kernel_size
        positions = output_shape[1] * output_shape[2]
        super().__init__(name, input_shape, output_shape, (positions, spec.channels, input_shape[0] * k * k), output_shape, net)
        self.kernel_size, self.stride, self.padding = k, spec.stride, spec.padding

    def forward(self, y_prev, learning):
        """The columns' ff activity, keeping the unfolded patches of ``y_prev`` for learning.

        Parameters
        ----------
        y_prev : Tensor (B, in_channels, H_in, W_in)
            The ff activity of the sheet below.
        learning : bool
            Whether the trials learn; not used here (dropout layers use it).

        Returns
        -------
        Tensor (B, channels, H, W)
            The rectified activity ``y``.
        """
        patches = F.unfold(y_prev, self.kernel_size, padding=self.padding, stride=self.stride)
        self.saved = patches
        drive = local_drive(patches, self._ff).view(-1, *self.output_shape)
        if self._bias is not None:
            drive = drive + self._bias
        return drive.relu_()

    def feedback(self, gfb):
        """The feedback that the gated feedback ``gfb`` of these columns sends to the layer below.

        Parameters
        ----------
        gfb : Tensor (B, channels, H, W)
            The gated feedback of these columns.

        Returns
        -------
        Tensor (B, in_channels, H_in, W_in)
            The feedback reaching each column below, before its gate.
        """
        return local_feedback(gfb.flatten(2), self._fb, self.input_shape[1:], self.kernel_size, self.stride, self.padding)

    def weight_change(self, patches, dgfb):
        """The change of the ff (and fb) kernels; see :func:`local_weight_change`.

        Parameters
        ----------
        patches : Tensor (B, in_channels * k * k, positions)
            The unfolded windows of the sheet below, as :meth:`forward` saved them.
        dgfb : Tensor (B, channels, H, W)
            The gated feedback, scaled per trial by ``alpha * delta / B``.

        Returns
        -------
        Tensor (positions, channels, in_channels * k * k)
            The change of each position's kernel.
        """
        return local_weight_change(patches, dgfb.flatten(2))

    def bias_change(self, dgfb):
        """The change of the biases, one per column: ``dgfb`` summed over trials.

        Parameters
        ----------
        dgfb : Tensor (B, channels, H, W)
            The gated feedback, scaled per trial by ``alpha * delta / B``.

        Returns
        -------
        Tensor (channels, H, W)
            The bias change.
        """
        return dgfb.sum(0)


class DropoutColumns(DropoutLayer):
    """Silences a random subset of the columns below during learning trials; no weights
    (:class:`~agrel_sim.backends.DropoutLayer`).

    Parameters
    ----------
    name : str
        ``"layers.N"``, for messages.
    spec : Dropout
        The layer's description (its ``rate``).
    input_shape : tuple of int
        The shape of the columns below, which is also this layer's.
    net : TorchNetwork
        The network being built; its :attr:`~TorchNetwork.generator` draws the dropped columns.
    """

    def __init__(self, name, spec: Dropout, input_shape, net):
        self.name = name
        self.input_shape = self.output_shape = tuple(input_shape)
        self.rate = spec.rate
        self.generator = net.generator
        self.saved = None

    def forward(self, y_prev, learning):
        """``y_prev`` with a random subset of columns silenced and the others scaled by
        ``1 / (1 - rate)`` when ``learning``; else ``y_prev`` unchanged.

        Parameters
        ----------
        y_prev : Tensor (B, *input_shape)
            The ff activity of the columns below.
        learning : bool
            Whether the trials learn (only then are columns dropped).

        Returns
        -------
        Tensor (B, *input_shape)
            The activity after dropout.
        """
        if not learning or self.rate == 0:
            self.saved = None
            return y_prev
        keep = torch.rand(y_prev.shape, generator=self.generator, device=y_prev.device, dtype=torch.float32) >= self.rate  # not the default dtype, which a program may change
        self.saved = keep.to(y_prev.dtype) / (1 - self.rate)  # the gate times the survivors' scale
        return y_prev * self.saved

    def gate(self, y):
        """Where the columns below were kept (all of them outside learning trials).

        Parameters
        ----------
        y : Tensor (B, *input_shape)
            The activity after dropout; only its shape is used.

        Returns
        -------
        Tensor of bool (B, *input_shape)
            True where a column was kept.
        """
        return self.saved > 0 if self.saved is not None else torch.ones_like(y, dtype=torch.bool)

    def gate_feedback(self, fb, y):
        """The feedback ``fb`` to the columns below, zero where dropped and scaled like their activity.

        Parameters
        ----------
        fb : Tensor (B, *input_shape)
            The feedback sent down by the layer above.
        y : Tensor (B, *input_shape)
            The activity after dropout; not used.

        Returns
        -------
        Tensor (B, *input_shape)
            ``fb`` times the kept columns' scale ``1 / (1 - rate)``, 0 where dropped.
        """
        return fb if self.saved is None else fb * self.saved

    def feedback(self, gfb):
        """The gated feedback, passed on unchanged (the gate of dropped columns is in ``gfb``).

        Parameters
        ----------
        gfb : Tensor (B, *input_shape)
            The feedback from :meth:`gate_feedback`.

        Returns
        -------
        Tensor (B, *input_shape)
            ``gfb`` itself.
        """
        return gfb

    def tensors(self):
        """No weights: an empty dict.

        Returns
        -------
        dict
            ``{}``.
        """
        return {}


CHANGED_SAMPLE = 65536


@functools.lru_cache(maxsize=64)
def _synapse_sample(size: int, device: torch.device) -> torch.Tensor:
    """A fixed random sample of synapse indices, drawn once per weight size and device."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(size))[:CHANGED_SAMPLE].to(device)


def changed_fraction(change: torch.Tensor) -> torch.Tensor:
    """Fraction of synapses whose ``change`` is not zero: exact up to :data:`CHANGED_SAMPLE` synapses,
    beyond that measured on a fixed random sample of that many (standard error below 0.002).

    Parameters
    ----------
    change : Tensor
        A weight change (or, for EBP, a gradient), of any shape.

    Returns
    -------
    Tensor ()
        The fraction, in ``[0, 1]``.
    """
    flat = change.flatten()
    if flat.numel() > CHANGED_SAMPLE:
        flat = flat[_synapse_sample(flat.numel(), flat.device)]
    return torch.count_nonzero(flat) / flat.numel()


def _copy_into(target: torch.Tensor, value, name: str) -> None:
    """Set the weights ``target`` (named ``name`` in messages) to ``value``, checked by
    :func:`~agrel_sim.backends.weights_to_set`."""
    value = weights_to_set(value, target.shape, name, target.dtype)
    with torch.no_grad():
        target.copy_(value)


class TorchNetwork:
    """A :class:`~agrel_sim.network.ColumnNetwork` built into tensors.

    Parameters
    ----------
    description : ColumnNetwork
        The description to build.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ...
    dtype : torch.dtype
        Floating-point type of weights and activity (:data:`DTYPES`).
    seed : int
        Seeds the weight initialisation (drawn on the CPU in float64, so identical on every
        device; ff weights are the same in every feedback mode and for EBP, and independent fb
        weights are drawn after them) and the generator of action selection and dropout.

    Attributes
    ----------
    backend : str
        ``"torch"``, the key of this backend in :data:`agrel_sim.backends.BACKENDS`.
    description : ColumnNetwork
        The description the network was built from.
    device : torch.device
    dtype : torch.dtype
        The type of the weights and the activity (also :attr:`computes_in`).
    generator : torch.Generator
        On :attr:`device`: the randomness of action selection and dropout.
    layers : list
        The hidden column layers bottom to top, then the output layer; each has ``ff`` and
        ``fb`` weights (dropout layers have none: reading or setting them raises
        ``AttributeError``), read-only tensors (:class:`ReadOnlyWeights`) that are set by
        assignment of finite real numbers.
    learning_rate : float
        The step size alpha of the next updates; starts at ``description.rule.learning_rate``
        and may be changed between batches (a learning-rate schedule): a finite number > 0
        whose product with the rule's ``weight_decay`` is below 1, neither overflowing nor
        rounding to 0 in :attr:`dtype`.
    trials_run : int
        Trials run so far by :meth:`run_trials` (a checkpoint keeps it, as for the Brian2
        backend, whose traces it numbers).
    """

    backend = "torch"

    @property
    def computes_in(self) -> torch.dtype:
        """The floating-point type of the weights and the activity: :attr:`dtype`."""
        return self.dtype

    def __init__(self, description: ColumnNetwork, device="cpu", dtype=torch.float32, seed=0):
        self.description = description
        self.device = torch.device(device)
        self.dtype = dtype
        self.learning_rate = description.rule.learning_rate
        self._init_generator = torch.Generator().manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.trials_run = 0
        shapes = description.layer_shapes()
        self.layers = []
        for index, spec in enumerate(description.layers):
            name = f"layers.{index}"
            if isinstance(spec, Dense):
                layer = DenseColumns(name, spec, shapes[index], self)
            elif isinstance(spec, Conv2d):
                layer = ConvColumns(name, spec, shapes[index], shapes[index + 1], self)
            elif isinstance(spec, LocallyConnected2d):
                layer = LocallyConnectedColumns(name, spec, shapes[index], shapes[index + 1], self)
            else:
                layer = DropoutColumns(name, spec, shapes[index], self)
            self.layers.append(layer)
        self.layers.append(DenseColumns("output", Dense(description.n_actions), shapes[-2], self, linear=True))
        for layer in self.layers:
            if layer.has_weights and layer._fb is None:
                layer._fb = self.uniform(layer._ff.shape)
        if description.rule.name == "ebp":
            for tensor in self.parameters():
                tensor.requires_grad_(True)

    learning_rate = LEARNING_RATE

    def uniform(self, shape) -> torch.Tensor:
        """Weights uniform in ``[-init_range, init_range]``, drawn reproducibly on the CPU.

        Parameters
        ----------
        shape : tuple of int or torch.Size
            The shape of the weight tensor.

        Returns
        -------
        Tensor
            Of shape ``shape``, on :attr:`device` in :attr:`dtype`.
        """
        r = self.description.rule.init_range
        draw = torch.rand(shape, generator=self._init_generator, dtype=torch.float64) * (2 * r) - r
        return draw.to(self.device, self.dtype)

    def parameters(self) -> list[torch.Tensor]:
        """Every distinct weight and bias tensor.

        Returns
        -------
        list of Tensor
            The tensors the layers learn with (not copies), bottom to top: ``ff``, ``fb`` where
            not tied to ``ff``, ``bias`` where the rule has biases.
        """
        return [t for layer in self.layers for t in layer.tensors().values()]

    def weights(self) -> dict[str, torch.Tensor]:
        """Copies of all weights, keyed ``"<layer>.ff"``, ``"<layer>.fb"``, ``"<layer>.bias"``.

        Returns
        -------
        dict of str to Tensor
            Detached copies on :attr:`device` in :attr:`dtype`, in the layouts of the module
            docstring; ``fb`` entries even where tied to ``ff``.
        """
        out = {}
        for layer in self.layers:
            if layer.has_weights:
                out[f"{layer.name}.ff"] = layer._ff.detach().clone()
                out[f"{layer.name}.fb"] = layer._fb.detach().clone()
                if layer._bias is not None:
                    out[f"{layer.name}.bias"] = layer._bias.detach().clone()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set weights from a dict as returned by :meth:`weights` (every key must be present;
        in ``tied`` mode and for rule ``ebp`` the ``fb`` entries are checked but not used). Every entry is checked
        before any is set: a bad one leaves the network as it was.

        Parameters
        ----------
        weights : dict of str to Tensor
            Weights keyed as :meth:`weights` returns them, each of its layer's shape.

        Raises
        ------
        ValueError
            For missing or unexpected keys, or an entry that is not finite real numbers of the
            right shape.
        """
        check_weights_to_load(weights, self.weights(), self.dtype)
        for layer in self.layers:
            if layer.has_weights:
                layer.ff = weights[f"{layer.name}.ff"]
                if layer._fb is not layer._ff:
                    layer.fb = weights[f"{layer.name}.fb"]
                if layer._bias is not None:
                    layer.bias = weights[f"{layer.name}.bias"]

    def feedback_alignment(self) -> dict[str, float]:
        """How closely each layer's feedback weights mirror its feedforward weights.

        Returns
        -------
        dict of str to float
            For every layer with weights (the hidden column layers, not dropout layers, and
            ``output``), bottom to top: the cosine similarity of its ``ff`` and ``fb`` weights
            over all its synapses, biases excluded (:func:`agrel_sim.rule.feedback_alignment`);
            1.0 for ``tied`` and ``reciprocal`` feedback, NaN for rule ``ebp``, which has no
            feedback weights.
        """
        if self.description.rule.name == "ebp":
            return {layer.name: math.nan for layer in self.layers if layer.has_weights}
        return {layer.name: agrel.feedback_alignment(layer.ff, layer.fb) for layer in self.layers if layer.has_weights}

    # -- trials -------------------------------------------------------------------------------

    def _check_batch(self, images, labels=None, actions=None, check_range=True, trials=False):
        return check_batch(self.description, images, labels, actions, check_range, trials=trials, dtype=self.dtype).to(self.device)

    def _forward(self, x, learning):
        activity = [x]
        for layer in self.layers:
            activity.append(layer.forward(activity[-1], learning))
        return activity

    @torch.no_grad()
    def q_values(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Q-values of a batch with no dropout and no learning (for evaluation);
        ``check_range=False`` skips checking the images' values (see :func:`check_batch`).

        Parameters
        ----------
        images : Tensor (B, *input_shape)
            Floating-point stimuli: rates, finite and ``>= 0``.
        check_range : bool, default True
            Check that the images are finite and ``>= 0``.

        Returns
        -------
        Tensor (B, n_actions)
            The Q-values, on :attr:`device`.

        Raises
        ------
        TypeError, ValueError
            For a batch that does not fit the network.
        """
        x = self._check_batch(images, check_range=check_range)
        q = self._forward(x, learning=False)[-1]
        for layer in self.layers:
            layer.saved = None
        return q

    def run_trials(self, images, labels, actions=None, learn=True, record=False, check_range=True) -> Trials:
        """Run a batch of trials: the five phases of DeepAGREL, or one EBP step.

        Parameters
        ----------
        images : Tensor (B, *input_shape)
            Floating-point stimuli: rates, finite and ``>= 0``.
        labels : Tensor (B,) of any integer dtype
            The correct action of each trial.
        actions : Tensor (B,) of any integer dtype, optional
            Force these actions instead of selecting them (DeepAGREL only).
        learn : bool
            Apply plasticity (and dropout). With ``False`` the trial is only observed.
        record : bool
            Also return each layer's ff activity, fb activity and gate.
        check_range : bool
            Check that images are finite and ``>= 0`` and that labels and actions lie in
            ``[0, n_actions)``. On a GPU this makes the host wait for the device every batch;
            :func:`~agrel_sim.training.train` checks its data set once instead and passes ``False``.

        Returns
        -------
        Trials
            Q-values, actions and rewards; the RPE ``delta`` (DeepAGREL) or the ``loss`` (EBP);
            the layers' activity with ``record``.

        Raises
        ------
        TypeError, ValueError
            For a batch that does not fit the network, or ``actions`` with rule ``ebp``.
        """
        x = self._check_batch(images, labels, actions, check_range, trials=True)
        labels = labels.to(self.device, torch.long)
        if self.description.rule.name == "ebp":
            if actions is not None:
                raise ValueError("actions: forcing actions is meaningful only for rule 'deepagrel'")
            trials = self._ebp_trials(x, labels, learn, record)
        else:
            with torch.no_grad():
                trials = self._deepagrel_trials(x, labels, actions, learn, record)
        self.trials_run += x.shape[0]
        return trials

    def _deepagrel_trials(self, x, labels, actions, learn, record):
        net = self.description
        activity = self._forward(x, learning=learn)
        q = activity[-1]
        # Phase 2: action selection; phase 4: the global RPE.
        if actions is None:
            actions = agrel.select_action(q, net.action_selection.epsilon, net.action_selection.tau, self.generator)
        else:
            actions = actions.to(self.device, torch.long)
        rewards = agrel.reward(actions, labels, net.neuromodulator.reward_correct, net.neuromodulator.reward_wrong, self.dtype)
        delta = agrel.rpe(q, actions, rewards)
        # Phases 3 and 5, top to bottom: each layer passes feedback down through its fb weights
        # (before its own weights change), then changes its synapses by the four-factor rule.
        scale = delta * (self.learning_rate / x.shape[0])
        decay = self.learning_rate * net.rule.weight_decay
        fb = agrel.winner_feedback(actions, net.n_actions, self.dtype)
        records = []
        for index in range(len(self.layers) - 1, -1, -1):
            layer, y = self.layers[index], activity[index + 1]
            gfb = layer.gate_feedback(fb, y)
            if index > 0:
                fb = layer.feedback(gfb)
            changed = None
            if learn and layer.has_weights:
                change = layer.learn(layer.saved, gfb * scale.view(-1, *([1] * (gfb.dim() - 1))), decay)
                changed = changed_fraction(change) if record else None
            if record:
                records.append(LayerActivity(layer.name, y, gfb, layer.gate(y), changed))
            layer.saved = None
        return Trials(q, actions, rewards, delta=delta, layers=self._dropout_gates(records[::-1]) if record else None)

    def _dropout_gates(self, records: list[LayerActivity]) -> list[LayerActivity]:
        """Records (bottom to top) with the gates that learning used below dropout layers.

        A dropout layer silences columns of the layer below it: their gate is open only where the
        ff neuron is active and the column was kept. The dropout layer's record shows those same
        columns, with that gate and their fb activity.
        """
        for index in range(len(self.layers) - 1, 0, -1):  # top down, so that stacked dropouts combine
            if isinstance(self.layers[index], DropoutColumns):
                records[index - 1].gate = records[index - 1].gate & records[index].gate
        for index, layer in enumerate(self.layers):
            if isinstance(layer, DropoutColumns):
                records[index].gate, records[index].fb = records[index - 1].gate, records[index - 1].fb
        return records

    def _ebp_trials(self, x, labels, learn, record):
        net = self.description
        params = self.parameters()
        with torch.enable_grad():
            activity = self._forward(x, learning=learn)
            q = activity[-1]
            loss = F.cross_entropy(q, labels)
            grads = torch.autograd.grad(loss, params) if learn else None
        records = None
        if record:
            grad_of = {id(p): g for p, g in zip(params, grads)} if learn else {}
            records = []
            for layer, y in zip(self.layers, activity[1:]):
                y = y.detach()
                changed = changed_fraction(grad_of[id(layer._ff)]) if learn and layer.has_weights else None
                records.append(LayerActivity(layer.name, y, None, layer.gate(y), changed))
            records = self._dropout_gates(records)
        for layer in self.layers:
            layer.saved = None
        with torch.no_grad():
            if learn:
                decay = self.learning_rate * net.rule.weight_decay
                for tensor, grad in zip(params, grads):
                    if decay:
                        tensor.add_(tensor, alpha=-decay)
                    tensor.sub_(grad, alpha=self.learning_rate)
            q = q.detach()
            actions = q.argmax(1)
            rewards = agrel.reward(actions, labels, net.neuromodulator.reward_correct, net.neuromodulator.reward_wrong, self.dtype)
        return Trials(q, actions, rewards, loss=loss.detach(), layers=records)


def check_network(network: ColumnNetwork) -> None:
    """The torch backend builds every layer kind and both rules: nothing to refuse.

    Parameters
    ----------
    network : ColumnNetwork
        The description to check.
    """


# The floating-point types the backend computes in.
DTYPES = (torch.float32, torch.float64)


def build(network: ColumnNetwork, device="cpu", dtype=torch.float32, seed=0) -> TorchNetwork:
    """Build ``network`` into tensors; see :class:`TorchNetwork`.

    Parameters
    ----------
    network : ColumnNetwork
        The description to build.
    device : str or torch.device, default "cpu"
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : torch.dtype, default torch.float32
        Floating-point type of weights and activity, one of :data:`DTYPES`.
    seed : int, default 0
        Seeds the weight initialisation, action selection and dropout.

    Returns
    -------
    TorchNetwork

    Raises
    ------
    ValueError
        For a device other than cpu, cuda or cuda:N (or one this machine lacks), a dtype not in
        :data:`DTYPES` or a seed that is not an integer in ``[0, 2**63 - 1]``.
    """
    check_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(map(str, DTYPES))}, got {dtype!r}")
    check_seed(seed)
    check_representable(network, dtype)
    return TorchNetwork(network, device=device, dtype=dtype, seed=seed)
