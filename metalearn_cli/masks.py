"""Fixed zeros of a network: pruning masks that every algorithm keeps without knowing of them.

`ParameterMasks` holds one boolean tensor per masked parameter (True: the weight lives, False: it is
pruned) as buffers, so checkpoints save them under `extras.masks.*` and they follow the model's
device. `FunctionalModel.masked` multiplies parameters by them, and the two places that change
parameters apply it: `adapt` after every inner step (so adapted weights keep their zeros) and
`MetaLearner` after every outer step (so the meta-learned initialisation keeps them). The masked
entries of theta are zero, so a forward pass of theta needs no masking.

How the masks are chosen is `metalearn_cli.compression.pruning`'s business.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

#: the `extras` entry of a MetaLearner (and its checkpoint keys' prefix, `extras.masks.`) that holds the masks
MASKS = "masks"


class ParameterMasks(nn.Module):
    """Boolean masks of some of a model's parameters, by parameter name."""

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(masks)
        for name, mask in masks.items():
            self.register_buffer(_key(name), mask.detach().to(torch.bool).clone())

    @classmethod
    def in_state_dict(cls, model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str) -> "ParameterMasks | None":
        """The masks a state dict holds under `prefix` for `model`'s parameters (their shapes; the values come
        with the load), or None if it holds none."""
        found = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()
                 if prefix + _key(name) in state_dict}
        return cls(found) if found else None

    def by_name(self) -> dict[str, Tensor]:
        return {name: getattr(self, _key(name)) for name in self.names}

    @torch.no_grad()
    def zero_(self, model: nn.Module) -> None:
        """Set the pruned entries of `model`'s parameters to zero, in place."""
        parameters = dict(model.named_parameters())
        for name, mask in self.by_name().items():
            parameters[name].mul_(mask)

    @torch.no_grad()
    def zero_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of the pruned entries: the network is f(mask * theta), whose gradient is zero
        there, so the optimizer's state for them stays zero too."""
        parameters = dict(model.named_parameters())
        for name, mask in self.by_name().items():
            grad = parameters[name].grad
            if grad is not None:
                grad.mul_(mask)


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names may not hold dots
