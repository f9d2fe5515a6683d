"""Global magnitude pruning of a meta-learned initialisation (`compress.prune`, `compress.structured`).

What is pruned: the weights of the convolutions and linear layers (the output layer included), never
biases or batch norm. The masks are computed with `torch.nn.utils.prune` on a copy of the network and
then taken out of it (`prune.remove`): its reparametrisation (`weight_orig` and a forward pre-hook) is
not what the batched kernels read, so the masks live on as `metalearn_cli.masks.ParameterMasks`, which
every inner step and meta-update honours.

* unstructured: one ranking of |w| over all those weights together (`prune.global_unstructured` with
  `prune.L1Unstructured`); exactly round(fraction * total) weights are zeroed (Python's round, as torch's);
* structured: whole output units are zeroed, the output channels of the convolutions and the hidden
  units of linear layers (never the output layer's, which are the task's classes). A unit's score is the L2
  norm of its weights divided by the root mean square of the unit norms of its layer, so that layers of
  different fan-in and scale are ranked on one scale (a unit of average size for its layer scores 1);
  the round(fraction * units) lowest-scoring units are zeroed (`prune.custom_from_mask`), except that every
  layer keeps its strongest unit. The sparsity reported is then the share of zero weights this gives.

A network that is already pruned keeps its zeros: its masks are combined with the new ones (a fraction below
its sparsity changes nothing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from metalearn_cli import options
from metalearn_cli.masks import ParameterMasks


@dataclass(frozen=True)
class Pruning:
    """compress.prune (the fraction to zero, in [0, 1)) and compress.structured (whole units or single weights)."""

    fraction: float
    structured: bool = False

    def __post_init__(self) -> None:
        allowed = "a fraction in [0, 1): the share of the convolution and linear weights set to zero (0: none, 0.75: three quarters)"
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
            raise options.invalid("prune", self.fraction, allowed)
        if not 0.0 <= float(self.fraction) < 1.0:  # also refuses nan
            raise options.invalid("prune", self.fraction, allowed)
        if not isinstance(self.structured, bool):
            raise options.invalid("structured", self.structured,
                                  "true (zero whole output channels and hidden units) or false (single weights)")

    @property
    def method(self) -> str:
        if self.structured:
            return "global ranking of output channels and hidden units by L2 norm, normalised by their layer's RMS unit norm"
        return "global magnitude (L1) ranking of every convolution and linear weight"

    def masks(self, model: nn.Module, existing: ParameterMasks | None = None) -> ParameterMasks:
        """The masks of `model`'s prunable weights (a copy of it is pruned; `model` is not changed), combined
        with `existing` masks."""
        work = copy.deepcopy(model)
        layers = prunable_layers(work)
        if not layers:
            raise options.OptionError(
                f"`{{p}}prune` = {self.fraction!r}, but {type(model).__name__} has no convolution or linear layer to prune. "
                "Allowed: a checkpoint of conv4 or mlp."
            )
        if self.structured:
            masks = unit_masks(work, layers, self.fraction)
        else:
            prune.global_unstructured([(layer, "weight") for _, layer in layers], pruning_method=prune.L1Unstructured,
                                      amount=float(self.fraction))
            masks = {f"{name}.weight": layer.weight_mask.detach().to(torch.bool) for name, layer in layers}
            for _, layer in layers:
                prune.remove(layer, "weight")
        if existing is not None:
            for name, old in existing.by_name().items():
                masks[name] = masks[name] & old.to(masks[name].device) if name in masks else old.clone()
        return ParameterMasks(masks)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions and linear layers of `model`, by name, in the model's order."""
    return [(name, layer) for name, layer in model.named_modules() if isinstance(layer, (nn.Conv2d, nn.Linear))]


def output_layer(layers: list[tuple[str, nn.Module]]) -> str:
    """The name of the layer whose outputs are the network's (the `head` of conv4 and mlp, else the last one)."""
    names = [name for name, _ in layers]
    return "head" if "head" in names else names[-1]


def unit_scores(weight: Tensor) -> Tensor:
    """[out]: each output unit's L2 norm over the root mean square of the layer's unit norms."""
    norms = weight.detach().flatten(1).norm(dim=1)
    scale = norms.pow(2).mean().sqrt()
    return norms / scale if scale > 0 else norms


def unit_masks(work: nn.Module, layers: list[tuple[str, nn.Module]], fraction: float) -> dict[str, Tensor]:
    """Structured masks: the round(fraction * units) units of lowest score over all layers but the output
    layer are zeroed, each layer keeping its best one."""
    head = output_layer(layers)
    ranked = [(name, layer) for name, layer in layers if name != head]
    if not ranked:
        raise options.OptionError(
            "`{p}structured=true` zeroes output channels and hidden units, but the network has none besides its output "
            "layer. Allowed: {p}structured=false (single weights)."
        )
    scores = [unit_scores(layer.weight) for _, layer in ranked]
    for score in scores:  # each layer's strongest unit is never pruned: a layer of zeros would cut the network
        score[score.argmax()] = float("inf")
    flat = torch.cat(scores)
    count = min(round(fraction * flat.numel()), flat.numel() - len(scores))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count > 0:
        pruned[flat.argsort(stable=True)[:count]] = True
    masks: dict[str, Tensor] = {}
    offset = 0
    for (name, layer), score in zip(ranked, scores):
        keep = ~pruned[offset: offset + score.numel()]
        offset += score.numel()
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        prune.custom_from_mask(layer, "weight", keep.view(shape).expand_as(layer.weight).to(layer.weight.dtype))
        masks[f"{name}.weight"] = layer.weight_mask.detach().to(torch.bool)
        prune.remove(layer, "weight")
    head_layer = dict(layers)[head]
    masks[f"{head}.weight"] = torch.ones_like(head_layer.weight, dtype=torch.bool)
    return masks


def sparsity(masks: ParameterMasks) -> tuple[int, int]:
    """(pruned, total) entries of the masked weights."""
    values = masks.by_name().values()
    total = sum(m.numel() for m in values)
    return total - sum(int(m.sum()) for m in values), total
