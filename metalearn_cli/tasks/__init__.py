"""Kinds of task: what an algorithm adapts on and is scored on (see tasks.base)."""

from metalearn_cli.tasks.base import Params, Tasks
from metalearn_cli.tasks.objectives import CLASSIFICATION, REGRESSION, Objective
from metalearn_cli.tasks.supervised import TaskBatch

__all__ = ["Params", "Tasks", "Objective", "CLASSIFICATION", "REGRESSION", "TaskBatch"]
