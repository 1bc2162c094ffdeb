"""DP-SGD fine-tuning of the trainable part, with Opacus's per-sample gradients and clipping.

Each step draws a Poisson batch (every record independently with the sample rate), has
Opacus compute and clip every record's gradient, adds Gaussian noise of standard deviation
``noise_multiplier x max_grad_norm`` and divides by the expected batch size. Every step adds
noise, an empty batch included (its clipped sum is zero, so the step moves the weights by
noise alone): exactly what the accountant counts. Sampling and noise come from a
:class:`~common.privacy.noise.RandomSource`: the operating system's CSPRNG at every real site.

Opacus offers several ways to get the clipped per-record gradients (its *grad-sample modes*):
backward hooks (``hooks``), PyTorch's expanded weights (``ew``), ``torch.func`` (``functorch``)
and ghost clipping (``ghost``: per-record gradient norms without materialising the per-record
gradients, then a second backward pass of the clipped loss). Three more modes are ours:

- ``direct`` calls Opacus's own per-layer grad samplers (what its hooks mode calls) on the layer
  inputs kept by forward hooks and the output gradients of one ``torch.autograd.grad`` call: no
  backward hooks, and no plain gradient computed beside the per-record ones;
- ``ghost-direct``, for the same layers as ``direct``: the same forward hooks and autograd call, then each
  record's gradient norm without its gradient (ghost clipping's identity for linear and convolution
  layers: the norm of ``A_i^T B_i`` from the Gram matrices of the layer's input patches and output
  gradients, ``||a_i|| ||b_i||`` at one position, or the product itself where that is cheaper; Opacus's
  grad samplers for the few weights of normalisation layers), and the clipped sum as the gradient of the
  clipped loss ``sum_i c_i loss_i``, each weight's part from its kept input and rescaled output gradient;
- ``linear``, for a trainable part whose every trainable parameter is in its last layer, a linear
  one, fed 2-D inputs (the ``head`` policy): record i's gradient is the outer product of ``g_i``, the
  gradient of its loss with respect to its logits, and its input ``x_i`` (plus ``g_i`` for the bias),
  so its norm is ``||g_i|| * hypot(||x_i||, 1)`` and the clipped sum is one matrix product, without
  per-record gradient tensors.

In all three, Opacus's optimizer still noises, scales and steps (and clips, in ``direct``);
``tests/test_dp_direct_mode.py``, ``tests/test_dp_ghost_direct_mode.py`` and ``tests/test_dp_linear_mode.py``
check them against Opacus's per-sample gradients. Every mode computes the same clipped sum;
:func:`grad_sample_mode` picks, per trainable part, the one measured fastest, and the site reports it.

The sample rate is set from public values (the batch size and the site's declared size),
never from the exact number of records.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from common.model.batchnorm import FixedBatchNorm2d, check_per_sample_layers
from common.model.training import TrainConfig, example_loss_gradients, example_losses, make_optimizer
from common.privacy.noise import RandomSource, poisson_sample

GradSampleMode = Literal["hooks", "ew", "functorch", "ghost", "direct", "ghost-direct", "linear"]
#: Opacus's own grad-sample modes: every trainable part Opacus supports can use each of them.
OPACUS_MODES: tuple[GradSampleMode, ...] = ("hooks", "ew", "functorch", "ghost")
#: Every mode, ours included: ``direct`` (Opacus's grad samplers without backward hooks), ``ghost-direct``
#: (per-record norms without per-record gradients, for the same layers) and ``linear`` (factorised clipping of a
#: last linear layer).
GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = (*OPACUS_MODES, "direct", "ghost-direct", "linear")
#: Opacus's guard against dividing by a zero gradient norm (``DPOptimizer.clip_and_accumulate``).
_NORM_EPSILON = 1e-6
#: Layers PyTorch's expanded weights compute per-record gradients for (``torch.nn.utils._expanded_weights``).
_EXPANDED_WEIGHT_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)

#: Layers the ``direct`` mode computes per-record gradients for, each with the grad sampler Opacus's hooks mode calls.
_DIRECT_LAYERS = (*_EXPANDED_WEIGHT_LAYERS, FixedBatchNorm2d)


@dataclass(frozen=True)
class DPStats:
    """What one DP round did: ``steps`` noised steps (empty batches included), ``updates`` of them non-empty.

    ``mean_loss`` is for the site's own log only: it is computed on private batches and never leaves.
    """

    steps: int
    updates: int
    mean_loss: float
    sample_rate: float
    noise: str
    grad_sample_mode: str = "hooks"


def sample_rate_and_steps(declared_size: int, batch_size: int, epochs: int, local_steps: int = 0) -> tuple[float, int]:
    """The Poisson sample rate (1 / batches per epoch of the declared size) and the steps one round takes.

    Both come from public values: the site's declared size, the coordinator's batch size,
    epochs and ``local_steps`` (> 0: the round's exact number of steps; ``epochs`` is then unused).
    """
    batches = max(1, math.ceil(declared_size / batch_size))
    return 1.0 / batches, local_steps or batches * epochs


class UnsupportedGradSampleMode(ValueError):
    """A grad-sample mode was asked for a trainable part it cannot handle."""


def _split_last_linear(trainable: nn.Module) -> tuple[nn.Module | None, nn.Linear] | None:
    """``(prefix, layer)`` when every trainable parameter of ``trainable`` is in its last layer, an ``nn.Linear``
    (the prefix, None if there is none, then trains nothing and holds no buffers, such as a BatchNorm's running
    statistics, that a forward pass could change); None otherwise."""
    layers = list(trainable) if isinstance(trainable, nn.Sequential) else [trainable]
    if not layers or type(layers[-1]) is not nn.Linear or any(True for m in layers[:-1] for _ in m.buffers()):
        return None
    layer = layers[-1]
    trained = [p for p in layer.parameters() if p.requires_grad]
    if not trained or len(trained) != sum(p.requires_grad for p in trainable.parameters()):
        return None
    return (nn.Sequential(*layers[:-1]) if len(layers) > 1 else None), layer


def _linear_inputs(prefix: nn.Module | None, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return prefix(features) if prefix is not None else features


def _direct_layers(trainable: nn.Module) -> list[nn.Module] | None:
    """The layers holding ``trainable``'s trainable parameters, in order, if the ``direct`` mode handles every one."""
    layers = [m for m in trainable.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    samplers = GradSampleModule.GRAD_SAMPLERS
    if not layers or any(type(m) not in _DIRECT_LAYERS or type(m) not in samplers for m in layers):
        return None
    return layers


def supported_modes(trainable: nn.Module, features: torch.Tensor | None = None) -> tuple[GradSampleMode, ...]:
    """The grad-sample modes that can train ``trainable``: Opacus's, and ours where they apply.

    ``direct`` and ``ghost-direct`` need every trainable layer to be one of :data:`_DIRECT_LAYERS`; ``linear``
    needs every trainable parameter in a last ``nn.Linear`` whose inputs are 2-D (one vector per record); with
    ``features`` given, that check runs the prefix on the first record.
    """
    modes = OPACUS_MODES + (("direct", "ghost-direct") if _direct_layers(trainable) is not None else ())
    split = _split_last_linear(trainable)
    if split is None or (features is not None and _linear_inputs(split[0], features[:1]).dim() != 2):
        return modes
    return (*modes, "linear")


def grad_sample_mode(trainable: nn.Module, features: torch.Tensor | None = None) -> GradSampleMode:
    """The grad-sample mode for ``trainable`` (fed ``features``, if given), as ``fedtransfer bench dp`` measured it.

    ``linear`` wherever it applies (:func:`supported_modes`): a round on wdbc's head took 0.6x the time
    of the fastest of Opacus's modes, and on heart-disease's logistic regression 0.65x. Otherwise
    ``ghost-direct`` wherever it applies (where ``direct`` does). Measured side by side in one process
    (6 to 30 DP steps at batch 64 on cached features, seeded noise, against ``train_plain`` of the same
    part): on the pneumonia scenario's ResNet-18 ``last:1`` (8.4M weights) ``ghost-direct`` took 1.8 s
    against ``direct``'s 23.0 s for 6 steps (4.0x the plain steps against 51x; 1.3x with the noise draw
    left out, which is then most of its time); on the imaging CNN's ``last:1`` and wdbc's whole MLP
    it ties ``direct`` (1.62x and 1.66x plain against 1.71x and 1.74x), both ahead of expanded weights
    (2.3x) and backward hooks (2.3x and 3.0x). Earlier, ``direct`` took 0.7x expanded weights' time on the
    imaging CNN and wdbc and 0.85x backward hooks' on ResNet-18's ``last:1`` (whose fixed BatchNorm layers
    expanded weights cannot handle). Otherwise expanded weights, the fastest of Opacus's modes on every
    model of the zoo and transfer policy measured (backward hooks next, within a few tens of percent;
    ``torch.func`` and ghost clipping slower at these sizes); hooks wherever a trainable layer is one
    expanded weights cannot handle.
    """
    modes = supported_modes(trainable, features)
    if "linear" in modes:
        return "linear"
    if "ghost-direct" in modes:
        return "ghost-direct"
    training = [m for m in trainable.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return "ew" if all(type(m) in _EXPANDED_WEIGHT_LAYERS for m in training) else "hooks"


class _SourcedNoise:
    """Noise from a :class:`RandomSource`, one draw covering every parameter per step; the noised sum is
    divided by the expected batch size. Mixed into Opacus's optimizers (``params``, ``summed_grad``,
    ``_is_last_step_skipped``)."""

    params: list[nn.Parameter]
    _is_last_step_skipped: bool
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float

    def __init__(self, *args, source: RandomSource, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.noise_draws = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Opacus's ``zero_grad(set_to_none=True)`` without torch's optimizer machinery, whatever ``set_to_none`` says:
        every mode assigns the gradients anew or accumulates into unset ones, so zeroed and unset are the same."""
        for p in self.params:
            p.grad_sample = None
            if not self._is_last_step_skipped:
                p.summed_grad = None
            p.grad = None

    def add_noise(self) -> None:
        params = self.params
        sums = [p.summed_grad for p in params]
        dtype = sums[0].dtype
        noise = self.source.normal((sum(p.numel() for p in params),), self.noise_multiplier * self.max_grad_norm, dtype)
        start = 0
        for p, summed in zip(params, sums):
            part = noise[start : start + p.numel()].view_as(p)
            p.grad = summed.view_as(p) + (part if summed.dtype == dtype else part.to(summed.dtype))
            start += p.numel()
        self.noise_draws += 1

    def scale_grad(self) -> None:
        for p in self.params:
            p.grad.div_(self.expected_batch_size)


class _SourcedDPOptimizer(_SourcedNoise, DPOptimizer):
    """Opacus's DPOptimizer (clips the per-record gradients it is given) with our noise, and its flat clipping
    computed on one matrix of every parameter's per-record gradients."""

    def clip_and_accumulate(self) -> None:
        """Opacus's ``clip_and_accumulate`` in three tensor operations instead of several per parameter.

        Opacus takes each record's norm as the norm of its per-parameter norms and sums each parameter's
        clipped per-record gradients with its own ``einsum``; here the per-record gradients of every
        parameter are laid side by side in one (records x weights) matrix, whose row norms give the same
        clipping factors (Opacus's formula) and whose product with them the same clipped sum
        (``tests/test_dp_linear_mode.py`` compares the two).
        """
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        records = len(samples[0])
        flat = torch.cat([g.reshape(records, p.numel()).to(p.dtype) for g, p in zip(samples, params)], dim=1)
        factors = (self.max_grad_norm / (flat.norm(dim=1) + _NORM_EPSILON)).clamp_(max=1.0)
        summed = factors @ flat
        for p, part in zip(params, torch.split(summed, [p.numel() for p in params])):
            _check_processed_flag(p.grad_sample)
            grad = part.view_as(p)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


class _SourcedGhostOptimizer(_SourcedNoise, DPOptimizerFastGradientClipping):
    """Opacus's optimizer for ghost clipping (receives the clipped sum in ``p.grad``) with our noise."""


class _ClippedSumOptimizer(_SourcedGhostOptimizer):
    """The ghost-clipping optimizer for the ``linear`` mode, which writes a fresh clipped sum to ``p.grad`` at
    every step: Opacus's ``accumulate`` deep-copies it into ``p.summed_grad``, this one takes it as it is."""

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad + p.grad


class _ExampleLoss(nn.Module):
    """:func:`example_losses` as a loss module whose ``reduction`` Opacus may set (ghost clipping asks "none")."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.config = config
        self.reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = example_losses(logits, labels, self.config)
        return losses if self.reduction == "none" else losses.sum() if self.reduction == "sum" else losses.mean()


class _PrivateStep:
    """One trainable part wrapped for a grad-sample mode: the clipped-sum backward of a batch, or of none."""

    def __init__(
        self,
        trainable: nn.Module,
        config: TrainConfig,
        mode: GradSampleMode,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        source: RandomSource,
    ) -> None:
        self.mode = mode
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        loss_fn = _ExampleLoss(config)
        settings = dict(
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(expected_batch_size, 1e-9),
            loss_reduction="sum",
            source=source,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            if mode == "ghost":
                self.module = GradSampleModuleFastGradientClipping(
                    trainable, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
                )
                self.optimizer = _SourcedGhostOptimizer(make_optimizer(self.params, config), **settings)
                self.loss_fn = DPLossFastGradientClipping(self.module, self.optimizer, loss_fn, loss_reduction="sum")
            else:
                self.module = (
                    GradSampleModuleExpandedWeights(trainable, loss_reduction="sum")
                    if mode == "ew"
                    else GradSampleModule(
                        trainable, loss_reduction="sum", strict=False, force_functorch=mode == "functorch"
                    )
                )
                self.optimizer = _SourcedDPOptimizer(make_optimizer(self.params, config), **settings)
                self.loss_fn = loss_fn
        self.module.train()

    def backward(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The clipped per-record gradients of one non-empty batch, ready for the optimizer; its summed loss."""
        loss = self.loss_fn(self.module(features), labels)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            loss.backward()
        return float(loss.detach())

    def nothing_sampled(self) -> None:
        """An empty batch: a zero clipped sum, to which the step adds noise all the same."""
        for p in self.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)

    def close(self) -> None:
        """Take Opacus's hooks and attributes off the trainable part."""
        self.module.cleanup()


class _DirectStep:
    """The ``direct`` mode: Opacus's grad samplers, the functions its ``hooks`` mode calls, without its hooks.

    Forward hooks keep each trainable layer's input and output; one ``torch.autograd.grad`` call gives the
    gradient of the summed loss with respect to every such output (what Opacus's backward hooks receive),
    and the layer's grad sampler turns its input and that gradient into per-record gradients in
    ``p.grad_sample``. Unlike the hooks mode, the backward pass computes no gradient of the parameters
    themselves and calls no Python hook on the way. Opacus's optimizer then clips, noises, scales and
    steps as in the other modes; ``tests/test_dp_direct_mode.py`` compares the per-record gradients with
    Opacus's.
    """

    mode: GradSampleMode = "direct"
    #: The optimizer the per-record gradients (or, in ``ghost-direct``, their clipped sum) go to.
    optimizer_class: type[_SourcedNoise] = _SourcedDPOptimizer

    def __init__(
        self,
        trainable: nn.Module,
        config: TrainConfig,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        source: RandomSource,
    ) -> None:
        layers = _direct_layers(trainable)
        if layers is None:
            names = ", ".join(t.__name__ for t in _DIRECT_LAYERS)
            raise UnsupportedGradSampleMode(f"the {self.mode} mode needs every trainable layer to be one of {names}")
        self.layers = layers
        self.module = trainable
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.loss_fn = _ExampleLoss(config)
        self._seen: dict[nn.Module, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._handles = [layer.register_forward_hook(self._keep) for layer in layers]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            self.optimizer = self.optimizer_class(
                make_optimizer(self.params, config),
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=max(expected_batch_size, 1e-9),
                loss_reduction="sum",
                source=source,
            )
        trainable.train()

    def _keep(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        if layer in self._seen or not isinstance(output, torch.Tensor):
            raise UnsupportedGradSampleMode(
                f"the {self.mode} mode needs every trainable layer called once per batch, returning one tensor "
                f"({type(layer).__name__} is not)"
            )
        self._seen[layer] = (inputs, output)

    def backward(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The per-record gradients of one non-empty batch, in ``p.grad_sample``; its summed loss."""
        self._seen.clear()
        loss = self.loss_fn(self.module(features), labels)
        outputs = [self._seen[layer][1] for layer in self.layers]
        backprops = torch.autograd.grad(loss, outputs, allow_unused=True)
        for layer, output, backprop in zip(self.layers, outputs, backprops):
            inputs = [t.detach() for t in self._seen[layer][0]]
            grad_output = torch.zeros_like(output) if backprop is None else backprop  # an output the loss ignores
            for param, sample in GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, inputs, grad_output).items():
                if param.requires_grad:
                    param.grad_sample = sample
        self._seen.clear()
        return float(loss.detach())

    def nothing_sampled(self) -> None:
        """An empty batch: a zero clipped sum, to which the step adds noise all the same."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)

    def close(self) -> None:
        """Take the forward hooks off the trainable part."""
        for handle in self._handles:
            handle.remove()


class _GhostDirectStep(_DirectStep):
    """The ``ghost-direct`` mode: each record's gradient norm without its gradient, then the clipped sum.

    As in ``direct``, forward hooks keep each trainable layer's input and one ``torch.autograd.grad`` call
    gives the gradient ``b`` of the summed loss with respect to each such layer's output (record i's rows of
    ``b`` are the gradient of its own loss: a layer the mode trains is a per-record function). Record i's
    squared gradient norm is then summed over the layers (:func:`_layer_clipping`): for a linear layer or a
    convolution, whose input unfolds to ``A_i`` (positions x inputs) and whose output gradient is ``B_i``
    (positions x outputs), the weight's gradient is ``A_i^T B_i``, whose squared norm is
    ``||A_i||^2 ||B_i||^2`` at one position and otherwise ``sum((A_i A_i^T) * (B_i B_i^T))`` (ghost clipping's
    identity, Li et al. 2022) or the materialised ``A_i^T B_i``, whichever costs fewer operations; the bias's
    is ``||sum_t B_i||^2``. Other layers (fixed BatchNorm, GroupNorm, LayerNorm, ...: few weights) get their
    per-record gradients from Opacus's grad sampler. Opacus's flat clipping factor ``c_i`` over all of the
    record's trainable parameters follows, and the clipped sum is the gradient of ``sum_i c_i loss_i``: with
    respect to a layer's output that is ``c_i b_i``, so each weight's part is the ordinary weight gradient
    (``(c B)^T A`` summed over records and positions) of the kept input and the rescaled output gradient --
    the parameter half of a second backward pass, without running the input half again. It goes to ``p.grad``,
    and Opacus's ghost-clipping optimizer noises, scales and steps as in the ``linear`` mode
    (:class:`_ClippedSumOptimizer`); ``tests/test_dp_ghost_direct_mode.py`` compares norms and sums with
    Opacus's per-sample gradients.
    """

    mode: GradSampleMode = "ghost-direct"
    optimizer_class: type[_SourcedNoise] = _ClippedSumOptimizer

    def squared_norms(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, list[_ClippedSum], torch.Tensor]:
        """Each record's squared gradient norm (all trainable parameters), each layer's clipped sum, the loss."""
        self._seen.clear()
        loss = self.loss_fn(self.module(features), labels)
        outputs = [self._seen[layer][1] for layer in self.layers]
        backprops = torch.autograd.grad(loss, outputs, allow_unused=True)
        squared = torch.zeros(len(labels), dtype=loss.dtype)
        sums = []
        for layer, output, backprop in zip(self.layers, outputs, backprops):
            inputs = [t.detach() for t in self._seen[layer][0]]
            grad_output = torch.zeros_like(output) if backprop is None else backprop  # an output the loss ignores
            norms, clipped_sum = _layer_clipping(layer, inputs, grad_output)
            squared += norms
            sums.append(clipped_sum)
        self._seen.clear()
        return squared, sums, loss.detach()

    def backward(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The clipped per-record gradient sum of one non-empty batch, in ``p.grad``; its summed loss."""
        squared, sums, loss = self.squared_norms(features, labels)
        factors = (self.max_grad_norm / (squared.sqrt_() + _NORM_EPSILON)).clamp_(max=1.0)  # Opacus's formula
        for clipped_sum in sums:
            for param, grad in clipped_sum(factors).items():
                param.grad = grad
        return float(loss)

    def nothing_sampled(self) -> None:
        """An empty batch: a zero clipped sum, to which the step adds noise all the same."""
        for p in self.params:
            p.grad = torch.zeros_like(p)


#: A layer's clipped gradient sum, given every record's clipping factor: {parameter: its part of the sum}.
_ClippedSum = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def _layer_clipping(
    layer: nn.Module, inputs: list[torch.Tensor], grad_output: torch.Tensor
) -> tuple[torch.Tensor, _ClippedSum]:
    """A trainable layer's part of each record's squared gradient norm, and how to take its clipped sum."""
    factored = _factored(layer, inputs[0], grad_output) if type(layer) in (nn.Linear, nn.Conv2d) else None
    if factored is None:  # Opacus's per-record gradients: layers with few weights
        samples = {
            p: s
            for p, s in GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, inputs, grad_output).items()
            if p.requires_grad
        }
        squared = sum(s.reshape(len(s), -1).square().sum(1) for s in samples.values())
        return squared, lambda factors: {p: torch.tensordot(factors.to(s.dtype), s, dims=1) for p, s in samples.items()}
    a, b, weight_sum = factored
    weight, bias = layer.weight, layer.bias
    squared = torch.zeros(len(b), dtype=b.dtype)
    samples = None  # the weight's per-record gradients, where computing them is the cheaper way to their norms
    if weight.requires_grad:
        norms, samples = _product_norms(a, b)
        squared += norms
    if bias is not None and bias.requires_grad:
        squared += b.sum(2).square().sum(1)

    def clipped_sum(factors: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        scaled = grad_output * factors.to(grad_output.dtype).view(-1, *([1] * (grad_output.dim() - 1)))
        grads = {}
        if weight.requires_grad:
            grads[weight] = (
                weight_sum(scaled) if samples is None else torch.tensordot(factors, samples, dims=1).view_as(weight)
            )
        if bias is not None and bias.requires_grad:
            channels_last = type(layer) is nn.Linear  # a linear layer's features are its last dimension
            grads[bias] = scaled.reshape(-1, len(bias)).sum(0) if channels_last else scaled.sum((0, 2, 3))
        return grads

    return squared, clipped_sum


def _factored(
    layer: nn.Module, x: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """A linear layer's or a plain convolution's input and output gradient as (records, features, positions)
    tensors ``A``, ``B``, whose per-record product ``A_i B_i^T`` is the weight's gradient, and the weight's
    summed gradient given a (rescaled) output gradient; None for a layer this does not cover."""
    records = len(grad_output)
    if type(layer) is nn.Linear:
        if x.dim() == 2:
            a, b = x.unsqueeze(2), grad_output.unsqueeze(2)
        else:
            a = x.reshape(records, -1, x.shape[-1]).transpose(1, 2)
            b = grad_output.reshape(records, -1, grad_output.shape[-1]).transpose(1, 2)
        return a, b, lambda scaled: scaled.reshape(-1, scaled.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None

    def weight_sum(scaled: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(
            x, layer.weight.shape, scaled, layer.stride, layer.padding, layer.dilation, layer.groups
        )

    b = grad_output.reshape(records, grad_output.shape[1], -1)
    return _patches(x, layer.kernel_size, layer.padding, layer.stride, layer.dilation), b, weight_sum


def _patches(
    x: torch.Tensor,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The convolution's input patches, (records, channels x kernel rows x kernel columns, output positions):
    what ``nn.functional.unfold`` returns, taken as a strided view of the padded input and copied once."""
    padded = nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    records, channels, height, width = padded.shape
    rows = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    columns = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    s_records, s_channels, s_height, s_width = padded.stride()
    view = padded.as_strided(
        (records, channels, kernel[0], kernel[1], rows, columns),
        (
            s_records,
            s_channels,
            s_height * dilation[0],
            s_width * dilation[1],
            s_height * stride[0],
            s_width * stride[1],
        ),
    )
    return view.reshape(records, channels * kernel[0] * kernel[1], rows * columns)


def _product_norms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``||B_i A_i^T||_F^2`` for every record i of ``a`` (records x d x T) and ``b`` (records x p x T), and the
    products themselves (records x p x d) if they were computed, None otherwise.

    At one position (T = 1) it is ``||a_i||^2 ||b_i||^2``; otherwise the ghost-norm identity
    ``sum((A_i^T A_i) * (B_i^T B_i))`` (about T^2 (d + p) multiplications per record) or the product itself
    (T d p, and then reused for the clipped sum), whichever is fewer.
    """
    d, p, positions = a.shape[1], b.shape[1], a.shape[2]
    if positions == 1:
        return a.square().sum((1, 2)) * b.square().sum((1, 2)), None
    if positions * (d + p) <= d * p:
        return (torch.bmm(a.transpose(1, 2), a) * torch.bmm(b.transpose(1, 2), b)).sum((1, 2)), None
    products = torch.bmm(b, a.transpose(1, 2))
    return products.square().sum((1, 2)), products


class _LinearStep:
    """The ``linear`` mode: a last linear layer's clipped per-record gradient sum, factorised.

    Record i's loss depends on the layer's weights only through its logits ``z_i = W x_i + b``, so its
    gradient is ``g_i x_i^T`` for ``W`` and ``g_i`` for ``b``, with ``g_i`` the gradient of its loss with
    respect to ``z_i`` (:func:`~common.model.training.example_loss_gradients`, in closed form).
    The norm of the joint gradient is ``||g_i|| * hypot(||x_i||, 1)`` (``||g_i|| * ||x_i||`` for a frozen
    bias, ``||g_i||`` for a frozen weight), the clipping factor is Opacus's, and the clipped sum is
    ``(c * g)^T x`` and ``sum_i c_i g_i``. Opacus's ghost-clipping optimizer, which receives a clipped sum
    in ``p.grad``, then noises, scales and steps as in the other modes (:class:`_ClippedSumOptimizer`).
    """

    mode: GradSampleMode = "linear"

    def __init__(
        self,
        trainable: nn.Module,
        config: TrainConfig,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        source: RandomSource,
    ) -> None:
        split = _split_last_linear(trainable)
        if split is None:
            raise UnsupportedGradSampleMode(
                "the linear grad-sample mode needs every trainable parameter in a last Linear"
            )
        self.prefix, self.layer = split
        self.module = trainable
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.weight_trains = self.layer.weight.requires_grad
        self.bias_trains = self.layer.bias is not None and self.layer.bias.requires_grad
        self.max_grad_norm = max_grad_norm
        self.config = config
        self._one = torch.ones(())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            self.optimizer = _ClippedSumOptimizer(
                make_optimizer(self.params, config),
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=max(expected_batch_size, 1e-9),
                loss_reduction="sum",
                source=source,
            )
        trainable.train()

    def backward(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The clipped per-record gradient sum of one non-empty batch, in ``p.grad``; its summed loss."""
        x = features if self.prefix is None else _linear_inputs(self.prefix, features)
        if x.dim() != 2:
            raise UnsupportedGradSampleMode(f"the linear grad-sample mode needs 2-D inputs, not {tuple(x.shape)}")
        logits = nn.functional.linear(x, self.layer.weight.detach(), _detached(self.layer.bias))
        g = example_loss_gradients(logits, labels, self.config)
        norms = torch.linalg.vector_norm(g, dim=1)
        if self.weight_trains:
            inputs = torch.linalg.vector_norm(x, dim=1)
            norms.mul_(inputs.hypot_(self._one) if self.bias_trains else inputs)
        factors = (self.max_grad_norm / (norms + _NORM_EPSILON)).clamp_(max=1.0)
        clipped = g.mul_(factors.unsqueeze(1))
        if self.weight_trains:
            self.layer.weight.grad = clipped.T @ x
        if self.bias_trains:
            self.layer.bias.grad = clipped.sum(0)
        return example_losses(logits, labels, self.config).sum().item()

    def nothing_sampled(self) -> None:
        """An empty batch: a zero clipped sum, to which the step adds noise all the same."""
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def close(self) -> None:
        """Nothing to undo: the trainable part was never wrapped."""


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def dp_train(
    trainable: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    expected_batch_size: float,
    source: RandomSource,
    mode: GradSampleMode | None = None,
) -> DPStats:
    """Train ``trainable`` in place for ``steps`` DP-SGD steps on precomputed features.

    ``mode`` is the grad-sample mode (default: :func:`grad_sample_mode`).
    """
    mode = mode or grad_sample_mode(trainable, features)
    check_per_sample_layers(trainable)  # Opacus's own check, except for the constants of fixed BatchNorm layers
    private: _PrivateStep | _DirectStep | _LinearStep
    if mode == "linear":
        private = _LinearStep(trainable, config, noise_multiplier, max_grad_norm, expected_batch_size, source)
    elif mode == "direct":
        private = _DirectStep(trainable, config, noise_multiplier, max_grad_norm, expected_batch_size, source)
    elif mode == "ghost-direct":
        private = _GhostDirectStep(trainable, config, noise_multiplier, max_grad_norm, expected_batch_size, source)
    else:
        private = _PrivateStep(trainable, config, mode, noise_multiplier, max_grad_norm, expected_batch_size, source)
    anchor = {n: p.detach().clone() for n, p in trainable.named_parameters()} if config.proximal_mu > 0 else {}
    updates, total = 0, 0.0
    try:
        for _ in range(steps):
            batch = poisson_sample(source, len(labels), sample_rate)
            private.optimizer.zero_grad(set_to_none=True)
            if len(batch) == 0:
                private.nothing_sampled()
            else:
                total += private.backward(features[batch], labels[batch]) / len(batch)
                updates += 1
            if private.optimizer.pre_step():  # DPOptimizer.step without torch's optimizer-step profiling wrapper
                private.optimizer.original_optimizer.step()
            if config.proximal_mu > 0:
                _proximal_pull(trainable, anchor, config.lr * config.proximal_mu)
    finally:
        private.close()  # hooks off the trainable part, even when a step failed
    draws = private.optimizer.noise_draws
    if draws != steps:
        raise RuntimeError(f"DP-SGD added noise in {draws} of {steps} steps; refusing the round")
    return DPStats(
        steps=steps,
        updates=updates,
        mean_loss=total / max(updates, 1),
        sample_rate=sample_rate,
        noise=source.kind,
        grad_sample_mode=mode,
    )


@torch.no_grad()
def _proximal_pull(module: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """FedProx's pull towards the global weights, applied after the private step (post-processing)."""
    for name, param in module.named_parameters():
        param.sub_(rate * (param - anchor[name]))
