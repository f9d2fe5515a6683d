"""Meta-learning algorithms, each a function of a parameter dict (no in-place updates of the model)."""

from metalearn_cli.algorithms.anil import ANIL
from metalearn_cli.algorithms.base import Algorithm, MetaStep
from metalearn_cli.algorithms.finetune import Finetune
from metalearn_cli.algorithms.maml import MAML
from metalearn_cli.algorithms.mamlpp import MAMLpp
from metalearn_cli.algorithms.metasgd import MetaSGD
from metalearn_cli.algorithms.protonet import ProtoNet
from metalearn_cli.algorithms.reptile import Reptile
from metalearn_cli.functional import FunctionalModel

__all__ = ["Algorithm", "FunctionalModel", "MetaStep", "MAML", "ANIL", "MetaSGD", "MAMLpp", "ProtoNet", "Reptile", "Finetune"]
