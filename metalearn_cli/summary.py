"""The record of a scored run: what `test.json` and `eval.json` hold, and the one-line result."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def run_summary(experiment, cfg: DictConfig, choices: dict, ckpt: Path | str, split: str) -> dict:
    summary = dict(experiment.module.summaries[split])
    summary.update(
        split=split,
        ckpt=str(Path(ckpt).absolute()),
        algo=choices.get("algo"),
        data=choices.get("data"),
        train_on=experiment.source.train_on,
        model=choices.get("model"),
        ways=experiment.sampler.ways,
        shots=experiment.sampler.shots,
        queries=experiment.sampler.queries,
        **experiment.algorithm.eval_protocol(),
        task_seed=int(cfg.eval.task_seed),
        seed=int(cfg.seed),
    )
    return summary


def describe_result(summary: dict) -> str:
    scale, unit = (100.0, "%") if summary["metric"] == "acc" else (1.0, "")
    diverged = summary.get("nonfinite_tasks", 0)
    note = f"; adaptation diverged on {diverged} tasks (median {summary['median']:.4f})" if diverged else ""
    return (
        f"{summary['split']} {summary['metric']} after {summary['inner_steps']} steps: "
        f"{summary['mean'] * scale:.4f}{unit} ± {summary['ci95'] * scale:.4f}{unit} "
        f"(95% CI, {summary['num_tasks']} tasks{note})"
    )
