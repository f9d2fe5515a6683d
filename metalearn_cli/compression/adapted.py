"""One adapted task as a plain network of its own: what `metalearn export` writes to a file.

Evaluation adapts tasks with per-task parameters through a functional view of the model
(`metalearn_cli.functional`); a deployed model is one ordinary `nn.Module` holding one task's adapted
parameters. `fixed_network` makes it: a copy of the checkpoint's network with those parameters, whose
`MetaBatchNorm2d` layers become ordinary `nn.BatchNorm2d` layers in eval mode with fixed statistics, so
that every image is classified on its own, whatever else is in its batch:

* `model.bn=transductive`: the support set's batch statistics at each layer, as the adapted network sees
  them (one forward pass over the support images with the adapted parameters). Evaluation normalises the
  queries with the query batch's own statistics instead; the fixed network gives the support images the
  outputs transductive adaptation gave them. With `bn_batch="query"` the query batch's statistics are used
  instead, and the fixed network gives the queries evaluation's outputs (what int8 scoring quantizes).
* `model.bn=frozen` / `per_step`: the stored running statistics of the step the adaptation ended at, which
  evaluation scores the queries with: the fixed network is evaluation's predictor itself.

Each algorithm makes its adapted predictor from it (`Algorithm.adapted_network`): MAML and its kin the
network itself, ProtoNets the embedding with `PrototypeHead`, the fine-tune baselines the embedding with
the head trained on the support set (both as an `EmbeddingClassifier`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from metalearn_cli.functional import FunctionalModel, Params
from metalearn_cli.models import MetaBatchNorm2d

#: the images whose statistics a transductive layer is fixed with: the support set (an export, which must
#: answer each image alone) or the query batch (what evaluation normalises the queries with; int8 scoring)
BN_BATCHES = ("support", "query")


def statistics_images(task, bn_batch: str) -> Tensor:
    """One task's images ([S or Q, *input_shape]) that `bn_batch` names."""
    if bn_batch not in BN_BATCHES:
        raise ValueError(f"bn_batch = {bn_batch!r}; allowed: {', '.join(BN_BATCHES)}")
    return (task.support_x if bn_batch == "support" else task.query_x)[0]


@torch.no_grad()
def fixed_network(fmodel: FunctionalModel, params: Params, images: Tensor, step: int) -> nn.Module:
    """A copy of `fmodel`'s network with `params` (one task's, each of its parameter's own shape), in eval
    mode and without gradients, its batch norm fixed: statistics of `images` ([B, *input_shape], the support
    set or the query batch) where the layer is transductive, else the running statistics of inner step `step`."""
    network = copy.deepcopy(fmodel.module)
    for name, parameter in network.named_parameters():
        parameter.copy_(params[name])
    network.requires_grad_(False).eval()
    norms = [(name, layer) for name, layer in network.named_modules() if isinstance(layer, MetaBatchNorm2d)]
    measured = batch_statistics(network, [(n, layer) for n, layer in norms if layer.mode == "transductive"], images)
    for name, layer in norms:
        if layer.mode == "transductive":
            mean, var = measured[name]
        else:
            layer.step = step
            slot = layer._slot()
            mean, var = layer.running_mean[slot], layer.running_var[slot]
        fixed = nn.BatchNorm2d(layer.weight.shape[0], eps=layer.eps).to(layer.weight)
        fixed.weight.copy_(layer.weight)
        fixed.bias.copy_(layer.bias)
        fixed.running_mean.copy_(mean)
        fixed.running_var.copy_(var)
        parent, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent), child, fixed.requires_grad_(False).eval())
    return network


@torch.no_grad()
def batch_statistics(network: nn.Module, layers: list[tuple[str, MetaBatchNorm2d]], images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (mean, variance) per channel of what each layer normalises in a forward pass of `network` over
    `images`, computed as a transductive `MetaBatchNorm2d` computes its batch's (the biased variance: the
    one it divides by)."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    if not layers:
        return found

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            found[name] = (mean.flatten(), (x - mean).pow(2).mean(dim=(0, 2, 3)))
        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers]
    try:
        network(images)
    finally:
        for handle in handles:
            handle.remove()
    return found


class EmbeddingClassifier(nn.Module):
    """A network's features (its own output layer left out) and a classifier of them: images -> logits."""

    def __init__(self, embedding: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if isinstance(getattr(embedding, "head", None), nn.Module):
            embedding.head = nn.Identity()  # unused by the features: not shipped
        self.embedding = embedding
        self.head = head
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embedding(x, features_only=True))


class PrototypeHead(nn.Module):
    """ProtoNets' classifier of one task (`ProtoNet.query_logits`): logits[b, c] = -|| f_b - p_c ||^2 for the
    task's class prototypes p ([N, F]). The difference is written out, which ONNX can express (torch.cdist it
    cannot); it gives the same numbers up to rounding."""

    def __init__(self, prototypes: Tensor) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone())

    def forward(self, features: Tensor) -> Tensor:
        return -(features.unsqueeze(1) - self.prototypes).pow(2).sum(-1)
