"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals 2020): MAML whose inner loop adapts only
the head (the final linear layer); the body is meta-learned by the outer loop alone, with the exact
meta-gradient through the head's adaptation. The same as `algo=maml algo.inner_params=head`."""

from __future__ import annotations

from metalearn_cli import options
from metalearn_cli.algorithms.maml import MAML


class ANIL(MAML):
    name = "anil"

    def __init__(self, *args, inner_params: str = "head", **kwargs) -> None:
        if inner_params != "head":
            raise options.invalid("inner_params", inner_params, "head (ANIL adapts only the head; algo=maml adapts other sets)")
        super().__init__(*args, inner_params="head", **kwargs)
