"""Task distributions ("data sources"): what a task is and how to draw one.

Each source exposes the same small interface (see `TaskSource`); the episodic sampler
(`metalearn_cli.samplers`) decides which tasks are drawn, when, and with which seed.
"""

from metalearn_cli.data.base import TaskSource

__all__ = ["TaskSource"]
