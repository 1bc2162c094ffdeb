"""Plain (non-private) training and inference on the trainable part of a model.

The site's DP-SGD loop and the simulation baselines build on the same pieces:
``compute_features`` runs the frozen prefix once, ``train_plain`` fits the trainable
suffix on those features, ``predict_proba`` scores a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from common.settings import CLASS_WEIGHTS, OPTIMIZERS

INFERENCE_BATCH = 1024
B = TypeVar("B")


def use_one_torch_thread() -> None:
    """Run torch on one intra-op thread.

    Our models are small: extra threads only add synchronisation, and on a loaded 2-core
    machine two threads made a 300-step MLP fit take 56 s instead of 0.5 s.
    """
    torch.set_num_threads(1)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local fine-tuning.

    ``steps`` > 0 trains exactly that many mini-batch updates, reshuffling at every pass
    over the data, and ignores ``epochs``; 0 trains ``epochs`` whole epochs.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    proximal_mu: float = 0.0
    seed: int = 0
    steps: int = 0
    #: How the loss treats imbalanced classes (see :func:`example_losses`), with the class prior it uses.
    class_weights: str = "none"
    class_prior: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.epochs < 0 or self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"invalid training settings {self}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, not {self.class_weights!r}")
        if self.class_weights != "none" and not (
            self.class_prior and all(p > 0 for p in self.class_prior) and abs(sum(self.class_prior) - 1) < 1e-6
        ):
            raise ValueError(f"class_weights {self.class_weights!r} needs a prior of positive shares summing to 1")


def balanced_weights(prior: tuple[float, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each class's ``balanced`` weight: the smallest prior over the class's prior (the rarest class weighs 1)."""
    shares = torch.tensor(prior, dtype=dtype)
    return shares.min() / shares


def example_losses(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Each example's training loss (cross-entropy), shaped for imbalanced classes by ``config``.

    ``balanced``: each example's loss times (smallest prior) / (prior of its class), so every class
    weighs the same in expectation and the largest weight is 1: no record's gradient is made longer
    than plain cross-entropy's, so DP-SGD's clipping cannot cut a rare class's weight back (with
    weights above 1 it did: a class declared at 5% had weight 10, clipped to about 1). Without DP
    this is the class-balanced loss at a smaller step (a mean weight below 1). ``logit-adjust``:
    cross-entropy of the logits plus log prior (Menon et al., 2021), which trains for balanced
    error; predictions use the plain logits.
    Both are per-example, so DP-SGD clips and noises them like plain cross-entropy; the prior
    must be public (never counted from a site's records).
    """
    if config.class_weights == "logit-adjust":
        offsets = torch.log(torch.tensor(config.class_prior, dtype=logits.dtype))
        return nn.functional.cross_entropy(logits + offsets, labels, reduction="none")
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    if config.class_weights == "balanced":
        weights = balanced_weights(config.class_prior, logits.dtype)
        losses = losses * weights[labels]
    return losses


def example_loss_gradients(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The gradient of each example's :func:`example_losses` with respect to its own logits, row by row.

    Cross-entropy's is ``softmax(z) - onehot(y)``: of the logits plus log prior for ``logit-adjust``,
    times the example's class weight for ``balanced``. The same as autograd through
    :func:`example_losses` (``tests/test_dp_linear_mode.py``), without the autograd engine's overhead.
    """
    if config.class_weights == "logit-adjust":
        logits = logits + torch.log(torch.tensor(config.class_prior, dtype=logits.dtype))
    gradients = torch.softmax(logits, dim=1).sub_(nn.functional.one_hot(labels, logits.shape[1]))
    if config.class_weights == "balanced":
        weights = balanced_weights(config.class_prior, logits.dtype)
        gradients.mul_(weights[labels].unsqueeze(1))
    return gradients


def label_prior(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Class shares of ``labels`` with add-one smoothing (for public labels only: a source's, never a site's)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes] + 1.0
    return tuple(float(c) for c in counts / counts.sum())


@dataclass(frozen=True)
class TrainStats:
    steps: int
    examples: int
    mean_loss: float


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9 if config.optimizer == "sgd" else 0.0)


def round_batches(one_pass: Callable[[], Iterable[B]], config: TrainConfig) -> Iterator[B]:
    """The batches of one round: ``config.epochs`` passes of ``one_pass()``, or exactly ``config.steps``
    batches, starting a new pass whenever one runs out. ``one_pass()`` must yield at least one batch."""
    drawn = 0
    for _ in itertools.count() if config.steps else range(config.epochs):
        for batch in one_pass():
            yield batch
            drawn += 1
            if drawn == config.steps:
                return


def shuffled_batches(examples: int, config: TrainConfig, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one round, reshuffled at every pass (see :func:`round_batches`)."""
    if examples == 0:
        return iter(())
    return round_batches(lambda: torch.split(torch.randperm(examples, generator=generator), config.batch_size), config)


@torch.no_grad()
def compute_features(frozen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the frozen prefix in eval mode over ``x`` in batches."""
    frozen.eval()
    if len(frozen) == 0:
        return x
    return torch.cat([frozen(chunk) for chunk in torch.split(x, INFERENCE_BATCH)])


def proximal_term(module: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu/2)·||w - w_global||² over the trainable parameters."""
    total = torch.zeros(())
    for name, param in module.named_parameters():
        if param.requires_grad:
            total = total + (param - anchor[name]).pow(2).sum()
    return 0.5 * mu * total


def train_plain(trainable: nn.Module, features: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> TrainStats:
    """Mini-batch training of ``trainable`` on precomputed features (shuffled, seeded)."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    anchor = {n: p.detach().clone() for n, p in trainable.named_parameters()}
    generator = torch.Generator().manual_seed(config.seed)
    trainable.train()
    steps, total = 0, 0.0
    for batch in shuffled_batches(len(labels), config, generator):
        optimizer.zero_grad()
        loss = example_losses(trainable(features[batch]), labels[batch], config).mean()
        if config.proximal_mu > 0:
            loss = loss + proximal_term(trainable, anchor, config.proximal_mu)
        loss.backward()
        optimizer.step()
        steps += 1
        total += float(loss.detach())
    return TrainStats(steps=steps, examples=len(labels), mean_loss=total / max(steps, 1))


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Class probabilities of ``model`` on ``x``, in eval mode."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(chunk) for chunk in torch.split(x, INFERENCE_BATCH)])
    model.train(was_training)
    return torch.softmax(logits, dim=1).numpy()


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))
