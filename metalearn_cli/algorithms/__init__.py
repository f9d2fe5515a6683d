"""Meta-learning algorithms, each a function of a parameter dict (no in-place updates of the model)."""

from metalearn_cli.algorithms.base import Algorithm, MetaStep
from metalearn_cli.algorithms.finetune import Finetune
from metalearn_cli.algorithms.maml import MAML
from metalearn_cli.algorithms.reptile import Reptile
from metalearn_cli.functional import FunctionalModel

__all__ = ["Algorithm", "FunctionalModel", "MetaStep", "MAML", "Reptile", "Finetune"]
