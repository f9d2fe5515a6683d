"""`metalearn export ckpt=PATH support=DIR | task=I [query=DIR] [format=onnx|torchscript] [out=FILE]`: adapt a
checkpoint to one support set and write the adapted network as a file a runtime loads (docs/compression.md,
"Exporting an adapted model").

The support set is a labeled folder of the user's own images (`support=`, read through the checkpoint's own
preprocessing by `metalearn_cli.labeled_folder`), or test task `task=<i>` of the run: the task `metalearn eval`
scores as task i with the same overrides (eval.task_seed, sampler.shots/queries, `data=` for another data
set's, `eval.episodes` for the i-th episode of a file). The adaptation is evaluation's
(`Algorithm.adapted_network`), and batch norm is fixed from the support set (`compression.adapted`). The file
is run by its own runtime on the query images and compared with PyTorch (`compression.formats`); a JSON record
beside it says what the network takes and gives (classes in label order, input shape, preprocessing), the
check, and, where the queries' labels are known, the exported network's accuracy beside evaluation's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metalearn_cli import options
from metalearn_cli.errors import MetalearnError, exits_cleanly
from metalearn_cli.evaluate import Scoring, prepare, with_training_groups
from metalearn_cli.run_folder import register_resolvers, run_dir_of_checkpoint, write_json_atomic

#: keys of this command itself; every other override is checked as `metalearn eval` checks its own
EXPORT_KEYS = ("support", "query", "task", "format", "out")
IMAGE_DATA = "omniglot, folder, mnist, cifar_fs, miniimagenet"


@dataclass
class Request:
    """What the command line asks, checked before the checkpoint is read."""

    format: Any  # compression.formats.ExportFormat
    support: str | None
    query: str | None
    task: int | None


@dataclass
class Target:
    """The one task a checkpoint is adapted to, and what the record says about it."""

    #: support set, and the images the export is checked on (the support images again where no others are given)
    task: Any  # TaskBatch of one task
    classes: list[str]
    #: the source whose preprocessing made the inputs
    source: Any
    #: the default file name, without suffix
    name: str
    #: what the checked images are ("query images", "support images"); their labels count only for query images
    checked_on: str
    described: dict = field(default_factory=dict)

    @property
    def scores_queries(self) -> bool:
        return self.checked_on == "query images"


def read_request(cfg: DictConfig) -> Request:
    from metalearn_cli.compression.formats import ExportFormat

    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise MetalearnError("`ckpt` is missing: name the checkpoint to adapt, e.g. "
                             "`metalearn export ckpt=outputs/<date>/<time>/checkpoints/best.ckpt support=~/my_classes`.")
    support, query, task = cfg.get("support"), cfg.get("query"), cfg.get("task")
    if (support is None) == (task is None):
        given = "both" if support is not None else "neither"
        raise MetalearnError(
            f"`support` and `task` name the support set to adapt the checkpoint to, and {given} of them {'are' if given == 'both' else 'is'} "
            "given. Give exactly one: `support=<folder>` (your labeled images, <support>/<class>/<image>) or `task=<i>` "
            "(test task i of the run, as `metalearn eval` scores it)."
        )
    if task is not None:
        task = options.integer("task", task, "the index of a test task of the run, from 0 to eval.num_tasks - 1", minimum=0)
        if query is not None:
            raise MetalearnError(f"`query` = {str(query)!r} goes with `support=<folder>`: test task {task} brings its own "
                                 "query images. Drop `query`.")
    return Request(ExportFormat(cfg.get("format")), None if support is None else str(support),
                   None if query is None else str(query), task)


def export(cfg: DictConfig) -> dict:
    request = read_request(cfg)
    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").partition("=")[0] not in EXPORT_KEYS]
    scoring = prepare(cfg, overrides)
    trained = scoring.parts.source
    if trained.objective.name != "classification" or not hasattr(trained, "inputs"):
        raise MetalearnError(
            f"`metalearn export` writes adapted image classifiers, but the checkpoint was trained on "
            f"{scoring.record['trained_on']}, {trained.objective.name} on inputs of shape {tuple(trained.input_shape)}. "
            f"Export a checkpoint trained on image classification data ({IMAGE_DATA})."
        )
    from metalearn_cli.compression.formats import short, temporary_beside
    from metalearn_cli.console import quiet_third_party

    quiet_third_party()
    experiment = scoring.experiment("Export")
    algorithm = experiment.algorithm
    if request.task is not None:
        target = task_target(scoring, algorithm, request.task)
    else:
        target = folder_target(scoring, algorithm, request.support, request.query)
    out = output_path(cfg, target, request.format)
    module = experiment.module.eval()  # as at test: frozen and per-step batch norm use their running statistics
    network = algorithm.adapted_network(module.fmodel, target.task)
    images = target.task.query_x[0]
    accuracy = scored(algorithm, module.fmodel, network, target, scoring) if target.scores_queries else None
    ways = len(target.classes)
    print(f"adapted algo={scoring.choices.get('algo')} to {target.described['what']}: {ways} classes "
          f"({', '.join(target.classes[:8])}{', ...' if ways > 8 else ''}), {target.task.support_x.shape[1]} support images")
    written = temporary_beside(out)
    try:
        request.format.write(network, target.task.support_x[0], written)
        check = request.format.check(network, written, images, target.checked_on)
        final = out if check.passed else failed_name(out)
        os.chmod(written, 0o644)
        os.replace(written, final)
    except BaseException:
        written.unlink(missing_ok=True)
        raise
    record = export_record(cfg, scoring, algorithm, target, request.format, final, check, accuracy)
    write_json_atomic(final.with_name(final.name + ".json"), record)
    print(check.line())
    if not check.passed:
        raise MetalearnError(
            f"the written {request.format.name} file does not compute what the adapted network computes: its outputs are up "
            f"to {check.max_abs_diff:.3g} away from PyTorch's on {check.images} {check.what} (allowed: {short(check.tolerance)}). "
            f"It is kept for inspection as {final} (record: {final.name}.json), not under the name asked for. "
            f"Try `format={'torchscript' if request.format.name == 'onnx' else 'onnx'}`, or another onnxruntime version."
        )
    if accuracy is not None:
        print(f"accuracy on the {accuracy['queries']} query images: exported {accuracy['exported']:.2%} (batch norm fixed "
              f"from the support set) | metalearn eval {accuracy['eval']:.2%} ({accuracy['eval_batch_norm']})")
    print(f"wrote {final} and {final.name}.json beside it")
    return record


# -- the support set ------------------------------------------------------------------------------
def task_target(scoring: Scoring, algorithm, index: int) -> Target:
    """Test task `index` of the run: a fixed test task, or the episode of `eval.episodes`."""
    if scoring.episodes is None:
        count, what = int(scoring.run_cfg.eval.num_tasks), f"`eval.num_tasks` = {int(scoring.run_cfg.eval.num_tasks)}"
    else:
        count, what = len(scoring.episodes.episodes), f"the {len(scoring.episodes.episodes)} episodes of `eval.episodes`"
    if index >= count:
        raise MetalearnError(
            f"`task` = {index}, but the run's test tasks are 0 .. {count - 1} ({what}). Allowed: an integer from 0 to "
            f"{count - 1}" + (" (score more tasks with `eval.num_tasks=...` to reach later ones)." if scoring.episodes is None else ".")
        )
    scoring.check_ways(algorithm)
    described: dict = {"task": index, "eval_task_seed": scoring.task_seed, "data": scoring.record["data"]}
    if scoring.episodes is None:
        source = scoring.sampler.source
        task = scoring.sampler.fixed_tasks("test", index + 1, scoring.task_seed).slice(index, index + 1)
        names = source.splits["test"].class_names if hasattr(source, "splits") else None
        classes = [names[c] for c in task.classes[0].tolist()] if names is not None and task.classes is not None else None
        described.update(ways=scoring.sampler.ways, shots=scoring.sampler.shots, queries=scoring.sampler.queries)
    else:
        source = scoring.parts.source
        groups, _ = scoring.test_tasks()
        group = next(g for g in groups if index in g.positions)
        row = group.positions.index(index)
        task = group.slice(row, row + 1)
        classes = None
        described.update(episodes=str(scoring.episodes.path), line=scoring.episodes.episodes[index].line)
    ways = int(task.support_y.max()) + 1
    described["what"] = f"test task {index} of {scoring.record['data']}"
    return Target(task, classes or [str(c) for c in range(ways)], source, f"test-task-{index}", "query images", described)


def folder_target(scoring: Scoring, algorithm, support_value: str, query_value: str | None) -> Target:
    """The user's labeled folder as the support set, and `query` (the same classes) as the images to check and score."""
    import torch

    from metalearn_cli.labeled_folder import read_labeled_folder
    from metalearn_cli.tasks import CLASSIFICATION, TaskBatch

    if scoring.episodes is not None or "data_config" in scoring.record:
        other = "`eval.episodes`" if scoring.episodes is not None else f"`data={scoring.record['data']}`"
        raise MetalearnError(f"{other} names test tasks to draw the support set from, and `support` = {support_value!r} is "
                             f"the support set itself. Drop {other}, or use `task=<i>` instead of `support`.")
    source = scoring.parts.source
    max_value = OmegaConf.select(scoring.run_cfg, "data.max_value", default=None)
    support = read_labeled_folder(support_value, "support", tuple(source.input_shape), max_value)
    ways = len(support.classes)
    if ways < 2:
        raise MetalearnError(f"`support` = {support_value!r} holds one class folder ({support.classes[0]!r}); a classifier "
                             "needs at least 2 classes, one sub-folder of images each.")
    if algorithm.head_fixes_ways:
        head = source.output_dim(scoring.build_cfg.sampler.ways)
        if ways != head:
            raise MetalearnError(
                f"`support` = {support_value!r} holds {ways} classes ({', '.join(support.classes[:8])}"
                f"{', ...' if ways > 8 else ''}), but the checkpoint's model (algo={scoring.choices.get('algo')}) classifies "
                f"with its own output layer of {head} classes, so it adapts to {head} classes only. Allowed: a folder of "
                f"{head} class folders. ProtoNets and the fine-tune baselines (algo=protonet, finetune) take any number of classes."
            )
    shots = int(scoring.sampler.shots)
    few = [(name, n) for name, n in zip(support.classes, support.counts) if n < shots]
    if few:
        listed = ", ".join(f"{name!r} has {n}" for name, n in few[:5])
        raise MetalearnError(
            f"`support` = {support_value!r}: every class needs at least {shots} images (`sampler.shots` = {shots}, the "
            f"shots the checkpoint is adapted and scored with), but {listed}{', ...' if len(few) > 5 else ''}. Add images, "
            f"or adapt with fewer: `sampler.shots={min(n for _, n in few)}`."
        )
    support_x = source.inputs(support.pixels)
    described: dict = {"support": str(support.root), "shots_per_class": dict(zip(support.classes, support.counts)),
                       "what": f"the support folder {support.root}"}
    if query_value is None:
        query_x, query_y, checked_on = support_x, support.labels, "support images"
    else:
        query = read_labeled_folder(query_value, "query", tuple(source.input_shape), max_value)
        if set(query.classes) != set(support.classes):
            missing = sorted(set(support.classes) - set(query.classes))
            extra = sorted(set(query.classes) - set(support.classes))
            parts = ([f"no folder for {', '.join(map(repr, missing[:5]))}"] if missing else []) + \
                    ([f"folders {', '.join(map(repr, extra[:5]))} that `support` lacks"] if extra else [])
            raise MetalearnError(f"`query` = {query_value!r} must have the class folders of `support` ({', '.join(support.classes[:8])}"
                                 f"{', ...' if ways > 8 else ''}), and it has {' and '.join(parts)}. Name its class folders as support's.")
        relabel = torch.tensor([support.classes.index(name) for name in query.classes])
        query_x, query_y, checked_on = source.inputs(query.pixels), relabel[query.labels], "query images"
        described["query"] = str(query.root)
    seed = scoring.task_seed
    task = TaskBatch(support_x[None], support.labels[None], query_x[None], query_y[None], seed=seed,
                     task_seeds=torch.tensor([seed]), objective=CLASSIFICATION)
    return Target(task, list(support.classes), source, Path(support.root).name or "support", checked_on, described)


# -- what is written --------------------------------------------------------------------------------
def output_path(cfg: DictConfig, target: Target, fmt) -> Path:
    """`out`, or `<run>/export/<name><suffix>`; neither it nor its record may exist (an export is never overwritten)."""
    if cfg.get("out"):
        out, key = Path(str(cfg.out)).expanduser().absolute(), "out"
    else:
        out, key = run_dir_of_checkpoint(cfg.ckpt) / "export" / f"{target.name}{fmt.suffix}", None
    for path in (out, out.with_name(out.name + ".json")):
        if path.exists():
            named = f"`out` = {str(cfg.out)!r}" if key else f"the default file {str(path)!r}"
            raise MetalearnError(f"{named} already exists; an export never overwrites a file. Name a new one with `out=...`, "
                                 "or delete that one (and its .json record) first.")
    return out


def failed_name(out: Path) -> Path:
    """Where a file that failed its check is kept: `<stem>.failed-check<suffix>` (numbered if taken)."""
    n = 0
    while True:
        candidate = out.with_name(f"{out.stem}.failed-check{'' if n == 0 else f'-{n}'}{out.suffix}")
        if not candidate.exists() and not candidate.with_name(candidate.name + ".json").exists():
            return candidate
        n += 1


def scored(algorithm, fmodel, network, target: Target, scoring: Scoring) -> dict:
    """The query accuracy of the exported network (each image on its own) and evaluation's on the same task."""
    import torch

    task = target.task
    queries = int(task.query_x.shape[1])
    with torch.no_grad():
        exported = int((network(task.query_x[0]).argmax(-1) == task.query_y[0]).sum()) / queries
    evaluated = round(float(algorithm.evaluation(fmodel, task).scores[0, -1]) * queries) / queries  # its float32 mean of hits, as a count
    bn = OmegaConf.select(scoring.run_cfg, "model.bn", default=None)
    how = {"transductive": "transductive: normalised with the query batch's own statistics",
           "frozen": "model.bn=frozen: the same running statistics",
           "per_step": "model.bn=per_step: the same running statistics"}.get(bn, "no batch norm")
    return {"queries": queries, "exported": exported, "eval": evaluated, "eval_batch_norm": how}


def preprocessing(source) -> dict:
    """How an image file becomes the network's input, as the checkpoint's data made its inputs."""
    channels, height, width = (int(v) for v in source.input_shape)
    invert = bool(getattr(source, "invert", False))
    return {
        "channels": channels,
        "color": "grey (Pillow mode L)" if channels == 1 else "RGB",
        "size": [height, width],
        "resize": f"Pillow's Image.LANCZOS to {width}x{height}, aspect ratio not kept",
        "invert": invert,
        "input": ("x = 1 - pixel / 255" if invert else "x = pixel / 255") + ", float32, layout [batch, C, H, W]",
    }


def export_record(cfg, scoring: Scoring, algorithm, target: Target, fmt, final: Path, check, accuracy: dict | None) -> dict:
    channels, height, width = (int(v) for v in target.source.input_shape)
    bn = OmegaConf.select(scoring.run_cfg, "model.bn", default=None)
    statistics = {
        "transductive": "the support set's batch statistics at each layer, fixed (evaluation normalises each query batch with its own)",
        "frozen": "the checkpoint's running statistics (as evaluation)",
        "per_step": "the checkpoint's running statistics of the step adaptation ends at (as evaluation)",
    }.get(bn)
    adaptation = {key: value for key, value in target.described.items() if key != "what"}
    adaptation.update(support_images=int(target.task.support_x.shape[1]), eval_protocol=algorithm.eval_protocol())
    if algorithm.has_inner_loop:
        adaptation["eval_inner_steps"] = algorithm.eval_inner_steps
    record = {
        "format": fmt.name,
        "file": final.name,
        "ckpt": str(Path(str(cfg.ckpt)).expanduser().absolute()),
        "algo": scoring.choices.get("algo"),
        "trained_on": scoring.record["trained_on"],
        "classes": target.classes,
        "input": {"name": "images", "shape": ["batch", channels, height, width], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", len(target.classes)],
                   "meaning": "one score per class, in the order of `classes`; the largest is the prediction"},
        "preprocessing": preprocessing(target.source),
        "adaptation": adaptation,
        "batch_norm": {"model.bn": bn, "statistics": statistics},
        "check": check.record(),
    }
    if accuracy is not None:
        record["accuracy"] = accuracy
    record["exported_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def hydra_folder(ckpt: str, out: str) -> str:
    """Hydra's run folder for an export (it writes nothing there; the folder is only checked to be writable): the
    nearest existing folder of `out`, else the checkpoint's run folder. An error leaves no new folder behind."""
    if not out:
        return str(run_dir_of_checkpoint(ckpt)) if ckpt else "."
    folder = Path(out).expanduser().absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return str(folder)


register_resolvers()
OmegaConf.register_new_resolver("metalearn_export_dir", hydra_folder, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://metalearn_cli.configs", config_name="export")
@exits_cleanly
def _app(cfg: DictConfig) -> dict:
    return export(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *with_training_groups(sys.argv[1:])]
    _app()


if __name__ == "__main__":
    main()
