"""`metalearn report PATH [PATH ...]`: read a sweep (or any run folders) at a glance.

For every run folder found under the paths (a folder holding `.hydra/config.yaml`), it reads the
overrides, `test.json` and `metrics.csv`, then writes next to the sweep:

* `report.md` and `report.csv`: one row per run, best first: the overrides that differ between
  runs, the test metric ± 95% CI (for reinforcement learning the return after each adaptation step,
  as the MAML paper reports it), the meta-iterations trained and the wall time;
* `report_val_curves.png`: the meta-validation metric of every run against meta-iterations;
* `report_adaptation.png`: the test metric (mean ± 95% CI) against adaptation steps, one line per
  algorithm and setting (the runs that differ only in `seed` are one line: the mean of their means,
  the CI over those runs; a single run's CI is over its test tasks; a run of `trainer.max_steps=0`
  is the line "untrained");
* `report_<key>.png`: the test metric against each swept hyperparameter (mean ± CI per value);
* `report_sinusoid.png` (sinusoid runs): the MAML paper's Figure 2 view for each run: the true
  function, the K support points and the predictions before and after 1 and 10 inner steps;
* `report_sparsity.png` (`metalearn compress` runs): the compressed network's test metric (± 95% CI) against
  its sparsity, one line per kind of pruning and meta-fine-tuning, the dense checkpoint's as a horizontal line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from pathlib import Path

import yaml

from metalearn_cli.errors import MetalearnError, report as report_error

#: metrics whose table lists the score after every adaptation step (the MAML paper reports returns after 0..3)
PER_STEP_METRICS = ("return",)
#: larger is better for these; the others (mse) fall
HIGHER_IS_BETTER = ("acc", "return")
#: overrides that repeat a configuration rather than define one: runs differing only in them are one line
REPEATS = ("seed",)


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for path in paths:
        if not path.exists():
            raise MetalearnError(f"the report path {str(path)!r} does not exist. Pass a sweep folder (multirun/<date>/<time>) or run folders.")
        found = [p.parent.parent for p in sorted(path.rglob(".hydra/config.yaml"))]
        runs += [r for r in found if r not in runs]
    if not runs:
        raise MetalearnError(
            f"no runs found under {', '.join(repr(str(p)) for p in paths)}: a run folder holds .hydra/config.yaml "
            "(outputs/<date>/<time>/ or multirun/<date>/<time>/<n>/)."
        )
    return runs


def _overrides(run: Path) -> dict[str, str]:
    items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    out = {}
    for item in items:
        key, _, value = str(item).lstrip("+~").partition("=")
        if not key.startswith("hydra."):
            out[key] = value
    return out


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def load_run(run: Path) -> dict:
    test = json.loads((run / "test.json").read_text()) if (run / "test.json").exists() else None
    return {"path": run, "overrides": _overrides(run), "test": test, "metrics": _metrics(run)}


def _fmt(summary: dict | None) -> tuple[str, float]:
    if not summary:
        return "(no test result)", float("nan")
    scale = 100.0 if summary["metric"] == "acc" else 1.0
    return f"{summary['mean'] * scale:.4f} ± {summary['ci95'] * scale:.4f}", summary["mean"]


def _per_step_columns(runs: list[dict], metric: str) -> tuple[list[str], list[int]]:
    """For metrics of PER_STEP_METRICS: a column per adaptation step any run was scored after."""
    if metric not in PER_STEP_METRICS:
        return [], []
    steps = sorted({row["step"] for r in runs if r["test"] for row in r["test"].get("per_step", [])})
    return [f"{metric} after {k} step{'' if k == 1 else 's'} ± 95% CI" for k in steps], steps


def _at_step(test: dict | None, step: int) -> str:
    row = next((row for row in (test or {}).get("per_step", []) if row["step"] == step), None)
    return "" if row is None else f"{row['mean']:.2f} ± {row['ci95']:.2f}"


def table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in runs for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1] or keys
    metric = next((r["test"]["metric"] for r in runs if r["test"]), "metric")
    higher_better = metric in HIGHER_IS_BETTER
    step_columns, steps = _per_step_columns(runs, metric)

    def order(r: dict) -> float:
        mean = r["test"]["mean"] if r["test"] else float("nan")
        if not math.isfinite(mean):
            return math.inf
        return -mean if higher_better else mean

    scores = step_columns or [f"test {metric}{' %' if metric == 'acc' else ''} ± 95% CI"]
    header = ["run", *swept, *scores, "steps", "wall time (s)"]
    rows = []
    for r in sorted(runs, key=order):
        text, _ = _fmt(r["test"])
        test = r["test"] or {}
        trained = test.get("steps", "")
        wall = test.get("train_seconds")
        values = [_at_step(r["test"], k) for k in steps] if steps else [text]
        rows.append([r["path"].name, *(r["overrides"].get(k, "") for k in swept), *values, str(trained),
                     f"{wall:.0f}" if isinstance(wall, (int, float)) else ""])
    return header, rows


def write_tables(header: list[str], rows: list[list[str]], out: Path, title: str) -> None:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    with (out / "report.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _label(run: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in run["overrides"].items()) or run["path"].name


def plot_val_curves(runs: list[dict], out: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((r["test"]["metric"] for r in runs if r["test"]), None)
    key = f"val/{metric}" if metric else None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn = 0
    for run in runs:
        points = [(int(row["step"]), float(row[key])) for row in run["metrics"] if key and row.get(key)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, [v * (100 if metric == "acc" else 1) for v in values], marker="o", markersize=3, label=_label(run))
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"validation {metric}{' (%)' if metric == 'acc' else ''}")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_title(f"Meta-validation curves: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path = out / "report_val_curves.png"
    return _saved(fig, path)


def configurations(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs with a per-step test result, one group per line to draw: named by the algorithm (or
    "untrained" for a run of 0 meta-iterations: an initialisation scored) and the other overrides that
    differ between runs, REPEATS (seeds) aside, so that the seeds of a configuration are one group."""
    scored = [r for r in runs if r["test"] and r["test"].get("per_step")]
    keys = sorted({k for r in scored for k in r["overrides"]})
    named = ("algo", "trainer.max_steps", *REPEATS)  # said by the name, or repeats
    swept = [k for k in keys if k not in named and len({r["overrides"].get(k) for r in scored}) > 1]
    groups: dict[str, list[dict]] = {}
    for run in scored:
        test = run["test"]
        name = "untrained" if test.get("steps") == 0 else str(test.get("algo", run["path"].name))
        label = " ".join([name, *(f"{k}={run['overrides'][k]}" for k in swept if k in run["overrides"])])
        groups.setdefault(label, []).append(run)
    return groups


def adaptation_curve(group: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """Steps, means and 95% CIs of a configuration's test metric after each adaptation step: one run's own
    (over its test tasks), or the mean of several runs' means with the CI over the runs."""
    per_run = [{row["step"]: row for row in r["test"]["per_step"]} for r in group]
    steps = sorted(set.intersection(*(set(rows) for rows in per_run)))
    if len(group) == 1:
        return steps, [per_run[0][k]["mean"] for k in steps], [per_run[0][k]["ci95"] for k in steps]
    means = [[rows[k]["mean"] for rows in per_run] for k in steps]
    return steps, [sum(m) / len(m) for m in means], [_ci(m) for m in means]


def plot_adaptation(runs: list[dict], out: Path, title: str) -> Path | None:
    """The test metric against adaptation steps, one line per configuration (the MAML paper's figure 4 view
    for 2D navigation: return after 0..3 policy-gradient steps, one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = configurations(runs)
    if not groups:
        return None
    metric = next(iter(groups.values()))[0]["test"]["metric"]
    scale = 100.0 if metric == "acc" else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (label, group) in enumerate(groups.items()):
        steps, means, cis = adaptation_curve(group)
        note = f" ({len(group)} runs, CI over runs)" if len(group) > 1 else ""
        dodge = 0.04 * (i - (len(groups) - 1) / 2)  # side by side, so that the error bars do not hide each other
        ax.errorbar([k + dodge for k in steps], [scale * m for m in means], yerr=[scale * c for c in cis], fmt="o-",
                    capsize=4, label=label + note)
    ax.set_xlabel("adaptation steps at test")
    ax.set_ylabel(f"test {metric}{' (%)' if metric == 'acc' else ''} (mean ± 95% CI)")
    if metric == "mse":
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("\n".join(textwrap.wrap(f"Test {metric} after each adaptation step: {title}", 90)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path = out / "report_adaptation.png"
    return _saved(fig, path)


def plot_against_hyperparameters(runs: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in runs for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    paths = []
    for key in swept:
        groups: dict[str, list[float]] = {}
        for run in runs:
            if run["test"] and math.isfinite(run["test"]["mean"]):
                groups.setdefault(run["overrides"].get(key, ""), []).append(run["test"]["mean"])
        if not groups:
            continue
        metric = next(r["test"]["metric"] for r in runs if r["test"])
        scale = 100.0 if metric == "acc" else 1.0
        labels = sorted(groups, key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
        means = [scale * sum(groups[v]) / len(groups[v]) for v in labels]
        errors = [scale * _ci(groups[v]) for v in labels]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.errorbar(range(len(labels)), means, yerr=errors, fmt="o-", capsize=4, label="mean over runs ± 95% CI")
        for i, v in enumerate(labels):
            ax.scatter([i] * len(groups[v]), [scale * x for x in groups[v]], color="gray", s=12, alpha=0.6,
                       label="single run" if i == 0 else None)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(f"test {metric}{' (%)' if metric == 'acc' else ''}")
        ax.set_title(f"Test {metric} against {key}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / f"report_{key.replace('/', '_').replace('.', '_')}.png"
        paths.append(_saved(fig, path))
    return paths


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def _ci(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return 1.96 * math.sqrt(var / len(values))


def plot_sinusoid(runs: list[dict], out: Path, title: str, max_runs: int = 12) -> Path | None:
    """The MAML paper's Figure 2 view for each sinusoid run with a checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from omegaconf import OmegaConf

    from metalearn_cli.algorithms.inner_optim import InnerSGD
    from metalearn_cli.build import build_experiment
    from metalearn_cli.run_folder import read_checkpoint
    from metalearn_cli.samplers import generator_for

    chosen = []
    for run in runs:
        ckpt = run["path"] / "checkpoints" / "best.ckpt"
        ckpt = ckpt if ckpt.exists() else run["path"] / "checkpoints" / "last.ckpt"
        if run["test"] and run["test"].get("data") == "sinusoid" and ckpt.exists():
            chosen.append((run, ckpt))
    if not chosen:
        return None
    chosen = chosen[:max_runs]
    cols = min(3, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (run, ckpt) in zip(axes.flat, chosen):
        try:
            checkpoint = read_checkpoint(ckpt, "ckpt")
            cfg = OmegaConf.create(checkpoint["metalearn"]["config"])
            experiment = build_experiment(cfg)
            experiment.module.load_state_dict(checkpoint["state_dict"])
        except (MetalearnError, RuntimeError) as error:  # e.g. a checkpoint of an older metalearn
            print(f"skipping the sinusoid plot of {run['path']}: {' '.join(str(error).split())[:200]}", file=sys.stderr)
            ax.axis("off")
            continue
        fmodel, algo, source = experiment.module.fmodel, experiment.algorithm, experiment.source
        generator = generator_for(int(cfg.eval.task_seed), "test", 0)
        amplitude, phase = source.functions(generator, 1)
        x_support = source._uniform(generator, source.x_range, experiment.sampler.shots, 1)
        y_support = amplitude[0] * torch.sin(x_support - phase[0])
        grid = torch.linspace(*source.x_range, 200).unsqueeze(1)
        params = {k: v.detach() for k, v in fmodel.params().items()}
        optimizer = InnerSGD(algo.eval_inner_lr)
        state = optimizer.init(params)
        ax.plot(grid, amplitude[0] * torch.sin(grid - phase[0]), color="red", label="ground truth")
        ax.plot(grid, fmodel(params, grid).detach(), ":", color="green", label="pre-update")
        for step in range(1, 11):
            grads = torch.func.grad(lambda p: torch.nn.functional.mse_loss(fmodel(p, x_support, step - 1), y_support))(params)
            params, state = optimizer.step(params, grads, state)
            if step in (1, 10):
                ax.plot(grid, fmodel(params, grid).detach(), "--" if step == 1 else "-",
                        color="tab:blue" if step == 1 else "navy", label=f"after {step} step{'s' if step > 1 else ''}")
        ax.scatter(x_support, y_support, marker="^", color="purple", zorder=5, label=f"{len(x_support)} support points")
        ax.set_title(_label(run) or run["path"].name, fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Sinusoid adaptation (test task 0, inner lr {algo.eval_inner_lr}): {title}")
    return _saved(fig, out / "report_sinusoid.png")


def plot_sparsity(runs: list[dict], out: Path, title: str) -> Path | None:
    """Compress runs: test metric (mean ± 95% CI over the test tasks) against sparsity, a line per kind of pruning
    (unstructured or structured) and number of meta-fine-tuning steps; each dense checkpoint's metric on the same
    tasks is a horizontal line with its CI as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = [r["test"] for r in runs if r["test"] and "compression" in r["test"]]
    if not compressed:
        return None
    metric = compressed[0]["metric"]
    scale = 100.0 if metric == "acc" else 1.0
    lines: dict[str, list[dict]] = {}
    for record in compressed:
        done = record["compression"]
        steps = done.get("finetune_steps", 0)
        label = f"{'structured' if done.get('structured') else 'unstructured'}, " + (
            f"meta-fine-tuned {steps} steps" if steps else "no meta-fine-tuning")
        lines.setdefault(label, []).append(record)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, records in sorted(lines.items()):
        records = sorted(records, key=lambda r: r["sparsity"])
        ax.errorbar([100 * r["sparsity"] for r in records], [scale * r["mean"] for r in records],
                    yerr=[scale * r["ci95"] for r in records], fmt="o-", capsize=4, label=label)
    dense = {r["dense"]["ckpt"]: r["dense"] for r in compressed}
    for i, (ckpt, summary) in enumerate(dense.items()):
        color = f"C{(len(lines) + i) % 10}"
        mean, ci = scale * summary["mean"], scale * summary["ci95"]
        name = "dense" if len(dense) == 1 else f"dense {Path(ckpt).parent.parent.name}"
        ax.axhline(mean, color=color, linestyle="--", label=f"{name} ({mean:.2f} ± {ci:.2f})")
        if math.isfinite(ci):
            ax.axhspan(mean - ci, mean + ci, color=color, alpha=0.12)
    ax.set_xlabel("sparsity (% of convolution and linear weights that are zero)")
    ax.set_ylabel(f"test {metric}{' (%)' if metric == 'acc' else ''} after adaptation (mean ± 95% CI)")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_title("\n".join(textwrap.wrap(f"Test {metric} against sparsity: {title}", 90)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _saved(fig, out / "report_sparsity.png")


def _saved(fig, path: Path) -> Path:
    """Write a finished figure to `path` (laid out, 120 dpi) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="metalearn report", description="Tables and plots of a sweep or of run folders.")
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder (multirun/<date>/<time>) or run folders")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first path)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(r) for r in find_runs(args.paths)]
        out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
        out.mkdir(parents=True, exist_ok=True)
        title = " + ".join(str(p) for p in args.paths)
        header, rows = table(runs)
        write_tables(header, rows, out, f"Sweep report: {title}")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        written = [out / "report.md", out / "report.csv"]
        written += [p for p in [plot_val_curves(runs, out, title)] if p]
        written += [p for p in [plot_adaptation(runs, out, title)] if p]
        written += plot_against_hyperparameters(runs, out, title)
        written += [p for p in [plot_sinusoid(runs, out, title)] if p]
        written += [p for p in [plot_sparsity(runs, out, title)] if p]
        print("wrote " + ", ".join(str(p) for p in written))
    except MetalearnError as error:
        report_error(error)
        sys.exit(2)


if __name__ == "__main__":
    main()
