"""Summaries of per-task scores: mean and 95% confidence interval after each inner step, and of the further
scores a task reports after the last step."""

from __future__ import annotations

import math

import torch


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval, 1.96 * s / sqrt(n) (s: sample std)."""
    values = values.double().flatten()
    n = values.numel()
    mean = values.mean().item()
    if n < 2:
        return mean, float("nan")
    return mean, 1.96 * values.std(unbiased=True).item() / math.sqrt(n)


def summarize(scores: torch.Tensor, metric: str, report: dict[str, torch.Tensor] | None = None) -> dict:
    """scores: [num_tasks, steps + 1], column k = metric after k inner steps. report: further [num_tasks]
    scores after the last step (`Tasks.query_report`: macro_f1, macro_recall), each summarised as
    summary[name] = {"mean", "ci95"} beside the metric's own mean and ci95."""
    per_step = []
    for step in range(scores.shape[1]):
        mean, ci = mean_ci95(scores[:, step])
        per_step.append({"step": step, "mean": mean, "ci95": ci})
    summary = {
        "metric": metric,
        "mean": per_step[-1]["mean"],
        "ci95": per_step[-1]["ci95"],
        "num_tasks": int(scores.shape[0]),
        "inner_steps": int(scores.shape[1] - 1),
        "per_step": per_step,
        # tasks whose adaptation diverged (metric inf or nan after the last step); they make the mean non-finite
        "nonfinite_tasks": int((~torch.isfinite(scores[:, -1])).sum()),
        "median": float(scores[:, -1].double().nanmedian()),
    }
    further = {}
    for name, values in (report or {}).items():
        if name in summary:
            raise ValueError(f"a task reports {name!r}, a name the summary already uses")
        mean, ci = mean_ci95(values)
        further[name] = {"mean": mean, "ci95": ci}
    # the further scores read best beside the metric's own mean and ci95
    return {"metric": metric, "mean": summary["mean"], "ci95": summary["ci95"], **further, **summary}


def reported(summary: dict) -> list[str]:
    """The names of the further scores `summarize` added (each {"mean", "ci95"}), in their order."""
    return [k for k, v in summary.items() if isinstance(v, dict) and set(v) == {"mean", "ci95"}]


def format_table(summary: dict) -> str:
    """The per-step table printed by `metalearn eval` and at the end of training, then the further
    scores of the last step (classification: macro_f1, macro_recall)."""
    metric = summary["metric"]
    scale, unit = (100.0, "%") if metric == "acc" else (1.0, "")
    lines = [f"{'step':>4}  {metric + unit:>10}  {'± 95% CI':>10}"]
    for row in summary["per_step"]:
        lines.append(f"{row['step']:>4}  {row['mean'] * scale:>10.4f}  {row['ci95'] * scale:>10.4f}")
    for name in reported(summary):
        value = summary[name]
        lines.append(f"{name} after {summary['inner_steps']} steps: "
                     f"{value['mean'] * scale:.4f}{unit} ± {value['ci95'] * scale:.4f}{unit}")
    return "\n".join(lines)
