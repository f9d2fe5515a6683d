"""The record of a scored run: what `test.json` and `eval.json` hold, and the one-line result."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def run_summary(experiment, cfg: DictConfig, choices: dict, ckpt: Path | str, split: str, scored: dict | None = None) -> dict:
    """`scored`: what the tasks were where they are not the run's sampler's (`metalearn eval`: the data set
    scored on and the one trained on, its shape, an episode file)."""
    summary = dict(experiment.module.summaries[split])
    summary.update(
        split=split,
        ckpt=str(Path(ckpt).absolute()),
        algo=choices.get("algo"),
        data=choices.get("data"),
        train_on=experiment.source.train_on,
        model=choices.get("model"),
        # how meta-training tasks were made (episodic: labelled classes; umtra, cactus: unlabeled images)
        sampler=choices.get("sampler", "episodic"),
        ways=experiment.sampler.ways,
        shots=experiment.sampler.shots,
        queries=experiment.sampler.queries,
        **experiment.algorithm.eval_protocol(),
        task_seed=int(cfg.eval.task_seed),
        seed=int(cfg.seed),
    )
    summary.update(scored or {})
    if hasattr(experiment.source, "scoring_record"):  # what the tasks were made of (RL: trajectories per step)
        summary.update(experiment.source.scoring_record(summary["shots"], summary["queries"]))
    return summary


def write_task_scores(path: Path, metric: str, scores, tasks: list[dict]) -> None:
    """`<run>/eval_tasks.csv`: one row per scored task, `tasks[i]` (its index and shape) then its metric
    after each inner step, for paired comparisons on the same tasks. Written whole, then renamed."""
    import csv
    import io
    import os
    import tempfile

    steps = [f"{metric}_step{k}" for k in range(scores.shape[1])]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*tasks[0], *steps])
    for row, values in zip(tasks, scores.numpy()):
        # numpy's shortest text of each value in its own precision: read back, it is the same number
        writer.writerow([*("" if v is None else v for v in row.values()), *(str(v) for v in values)])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe_result(summary: dict) -> str:
    scale, unit = (100.0, "%") if summary["metric"] == "acc" else (1.0, "")
    diverged = summary.get("nonfinite_tasks", 0)
    note = f"; adaptation diverged on {diverged} tasks (median {summary['median']:.4f})" if diverged else ""
    return (
        f"{summary['split']} {summary['metric']} after {summary['inner_steps']} steps: "
        f"{summary['mean'] * scale:.4f}{unit} ± {summary['ci95'] * scale:.4f}{unit} "
        f"(95% CI, {summary['num_tasks']} tasks{note})"
    )
