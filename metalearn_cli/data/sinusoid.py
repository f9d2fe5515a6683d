"""Sinusoid regression, exactly as in MAML (Finn et al. 2017, section 5.1).

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0] and phase phi ~ U[0, pi];
inputs x ~ U[-5, 5]; the loss is the mean squared error. The three splits share one
distribution: they differ only in the seeds their tasks are drawn with.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from metalearn_cli.data.base import TaskSource
from metalearn_cli.tasks import REGRESSION, TaskBatch


class Sinusoid(TaskSource):
    objective = REGRESSION
    input_shape = (1,)
    name = "sinusoid"

    def __init__(
        self,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
    ) -> None:
        self.amplitude = (float(amplitude[0]), float(amplitude[1]))
        self.phase = (float(phase[0]), float(phase[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))

    def output_dim(self, ways: int | None) -> int:
        return 1

    @staticmethod
    def _uniform(generator: torch.Generator, bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        low, high = bounds
        return torch.rand(*shape, generator=generator) * (high - low) + low

    def functions(self, generator: torch.Generator, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitudes and phases of `num_tasks` tasks, each of shape [T, 1, 1]."""
        amplitude = self._uniform(generator, self.amplitude, num_tasks, 1, 1)
        phase = self._uniform(generator, self.phase, num_tasks, 1, 1)
        return amplitude, phase

    def sample(self, split, generator, num_tasks, ways, shots, queries) -> TaskBatch:
        amplitude, phase = self.functions(generator, num_tasks)
        support_x = self._uniform(generator, self.x_range, num_tasks, shots, 1)
        query_x = self._uniform(generator, self.x_range, num_tasks, queries, 1)
        return TaskBatch(
            support_x=support_x,
            support_y=amplitude * torch.sin(support_x - phase),
            query_x=query_x,
            query_y=amplitude * torch.sin(query_x - phase),
            objective=REGRESSION,
        )
