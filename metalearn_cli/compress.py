"""`metalearn compress ckpt=PATH compress.prune=0.75 [compress.structured=true] [compress.finetune_steps=N]`:
prune a checkpoint's meta-learned initialisation, optionally meta-train the pruned network further with the
checkpoint's own algorithm and data (masks fixed), and record what it costs and what it weighs.

The command writes a new run folder: `checkpoints/` (the compressed network, with its masks: `metalearn eval`
scores it and adapts it with its zeros kept), `weights.sparse.pt` (its weights stored sparse), `eval.json`
(the record: the compressed network's test metric beside the dense checkpoint's on the same fixed test tasks,
sparsity, parameter counts, file sizes, CPU latency of query inference), the same record as `test.json` (the
run's own result, which `metalearn report` reads and a later `metalearn eval` never replaces), `evals.jsonl`
and `eval_tasks.csv` (every task's score, compressed and dense). Meta-fine-tuning is an ordinary training run
(train.py's machinery: checkpoints, logs, validation, clean stops) and resumes like one, with
`ckpt_path=<compress run>/checkpoints/last.ckpt` added to the same command.

Which weights are pruned and how: `metalearn_cli.compression.pruning`; how the masks hold through
adaptation: `metalearn_cli.masks`; the footprint: `metalearn_cli.compression.footprint`; docs/compression.md.
"""

from __future__ import annotations

import copy
import shlex
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from metalearn_cli import options
from metalearn_cli.errors import MetalearnError, exits_cleanly
from metalearn_cli.evaluate import TASK_SCORES, Scoring, in_task_order, prepare, with_training_groups
from metalearn_cli.run_folder import CHECKPOINT_KEY, append_jsonl, read_checkpoint, run_dir_of_checkpoint, write_json_atomic

if TYPE_CHECKING:
    from metalearn_cli.build import Experiment
    from metalearn_cli.compression.pruning import Pruning

#: settings of the meta-fine-tuning run that a compress command may choose (everything else is the checkpoint's,
#: or, like eval.* and algo.eval_inner_*, what `metalearn eval` may change)
FINETUNE_KEYS = (
    "trainer.val_check_interval",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "checkpoint.every_n_steps",
    "checkpoint.keep_all",
    "iterations_per_batch",
    "algo.outer_lr",
)
#: objectives whose tasks have query inputs to time and a metric to compare
SUPPORTED_OBJECTIVES = ("classification", "regression")
#: the compressed network's weights stored sparse, in the run folder
SPARSE_WEIGHTS = "weights.sparse.pt"


@dataclass(frozen=True)
class CompressSettings:
    """The `compress.*` keys, checked before anything is loaded."""

    pruning: "Pruning"
    finetune_steps: int
    latency_repeats: int
    #: "int8": each adapted task's network is also quantized and scored (None: float only)
    quantize: str | None = None

    @classmethod
    def of(cls, section: DictConfig) -> "CompressSettings":
        from metalearn_cli.compression.pruning import Pruning

        try:
            return cls(
                Pruning(section.prune, section.structured),
                options.integer("finetune_steps", section.finetune_steps,
                                "meta-iterations of meta-fine-tuning with the masks fixed; 0: none", minimum=0),
                options.integer("latency_repeats", section.latency_repeats, "timed forward passes of each network"),
                quantize_setting(section.get("quantize")),
            )
        except options.OptionError as error:
            raise error.under("compress") from None

    def as_config(self) -> dict:
        return {"prune": float(self.pruning.fraction), "structured": self.pruning.structured,
                "finetune_steps": self.finetune_steps, "latency_repeats": self.latency_repeats, "quantize": self.quantize}


#: `compress.quantize` values besides null (float only)
QUANTIZE = ("int8",)


def quantize_setting(value) -> str | None:
    if value is None or value in QUANTIZE:
        return value
    raise options.invalid("quantize", value, "null (score the float network only) or int8 (also quantize each adapted "
                          "task's network to int8 and score it beside float)")


def _key(override: str) -> str:
    return OverridesParser.create().parse_override(override).key_or_group


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(this command's own keys: compress.*, ckpt_path and the meta-fine-tuning settings; the rest, which are
    checked as `metalearn eval` checks its overrides)."""
    own, rest = [], []
    for override in overrides:
        key = _key(override)
        if key == "trainer.max_steps":
            raise MetalearnError(
                "`trainer.max_steps` is not set on a compress command: meta-fine-tuning runs `compress.finetune_steps` "
                "meta-iterations. Allowed: compress.finetune_steps=N (0: prune and score only)."
            )
        mine = key.startswith("compress.") or key == "ckpt_path" or key in FINETUNE_KEYS
        (own if mine else rest).append(override)
    return own, rest


def stream_start(checkpoint: dict) -> int:
    """Where meta-fine-tuning's meta-batches continue the checkpoint's training stream: after the meta-iterations
    it was trained for (and, for a checkpoint of a compress run, after the stream that run continued)."""
    earlier = (checkpoint[CHECKPOINT_KEY]["config"].get("compress") or {}).get("stream_start", 0)
    return int(earlier) + int(checkpoint.get("global_step", 0))


def finetune_config(scoring: Scoring, cfg: DictConfig, own: list[str], settings: CompressSettings, start: int) -> DictConfig:
    """The checkpoint's config as `metalearn eval` rebuilds it, made the config of a meta-fine-tuning run: its
    steps, this run's loggers and folder, the fine-tuning settings the command names, and `compress`, what
    was done (saved in every checkpoint of the run)."""
    run = OmegaConf.create(OmegaConf.to_container(scoring.build_cfg, resolve=True))
    with open_dict(run):
        for override in own:
            key = _key(override)
            if key in FINETUNE_KEYS:
                OmegaConf.update(run, key, OmegaConf.select(cfg, key), force_add=True)
        run.trainer.max_steps = settings.finetune_steps
        run.logger = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
        run.ckpt_path = cfg.ckpt_path
        run.compress = {**settings.as_config(), "source": str(Path(cfg.ckpt).expanduser().absolute()), "stream_start": start}
    return run


def check_resume_of(cfg: DictConfig, run: DictConfig, choices: dict, run_dir: Path) -> None:
    """A resume continues the same meta-fine-tuning: the same masks (prune, structured), a checkpoint of a
    compress run; other differences are listed as `metalearn train` lists them."""
    from metalearn_cli.config_checks import check_resume

    record = read_checkpoint(cfg.ckpt_path, "ckpt_path")[CHECKPOINT_KEY]
    saved = record["config"].get("compress") or {}
    if "stream_start" not in saved:
        raise MetalearnError(
            f"`ckpt_path` = {str(cfg.ckpt_path)!r} is not a checkpoint of a `metalearn compress` run. Resume a compress run "
            "with its own checkpoint (<compress run>/checkpoints/last.ckpt); a training run resumes with `metalearn train`."
        )
    for key in ("prune", "structured"):
        if saved.get(key) != run.compress[key]:
            raise MetalearnError(
                f"`ckpt_path` = {str(cfg.ckpt_path)!r} was meta-fine-tuned with `compress.{key}={saved.get(key)}`, but this "
                f"command asks for `compress.{key}={run.compress[key]}`: other masks are another experiment. Repeat the "
                "compress command (its run folder's .hydra/overrides.yaml lists its settings) and add `ckpt_path=...`."
            )
    changed = check_resume(record["config"], record.get("choices", {}), run, choices, str(cfg.ckpt_path),
                           run_dirs=(str(run_dir_of_checkpoint(cfg.ckpt_path)), str(run_dir)))
    if changed:
        print(f"Resuming {cfg.ckpt_path} with settings that differ from its run's: {'; '.join(changed)}.", file=sys.stderr)


def check_supported(scoring: Scoring, settings: CompressSettings) -> None:
    if "data_config" in scoring.record:
        raise MetalearnError(
            f"`metalearn compress` scores the dense and the compressed network on the checkpoint's own test tasks "
            f"(data={scoring.record['trained_on']}), not on data={scoring.record['data']}. Drop `data=` and the data.* keys "
            "that define another data set; score the compressed checkpoint there with `metalearn eval` afterwards."
        )
    objective = scoring.parts.source.objective
    if objective.name not in SUPPORTED_OBJECTIVES:
        raise MetalearnError(
            f"`ckpt` = {scoring.ckpt!r} was trained on {scoring.record['trained_on']}, {objective.name}, whose tasks are "
            "episodes the policy collects, without query inputs to time. `metalearn compress` takes checkpoints of "
            f"supervised data ({', '.join(SUPPORTED_OBJECTIVES)}): data=omniglot, folder, mnist, cifar_fs, miniimagenet, sinusoid."
        )
    model = scoring.parts.model if settings.quantize else None
    if settings.quantize and not getattr(model, "quantizable", False):
        raise MetalearnError(
            f"`compress.quantize` = {settings.quantize}, but the checkpoint's model, model={scoring.choices.get('model')} "
            f"({type(model).__name__}), has no int8 form here. Allowed: compress.quantize=null for this checkpoint; "
            "int8 takes checkpoints of model=conv4 or model=mlp."
        )
    algorithm = scoring.parts.algorithm
    if settings.finetune_steps and getattr(algorithm, "outer_optimizer", "adam") == "trpo":
        raise MetalearnError(
            f"`compress.finetune_steps` = {settings.finetune_steps}, but the checkpoint's meta-updates are trust-region "
            "steps (algo.outer_optimizer=trpo), whose conjugate-gradient direction and line search move pruned weights "
            "that the masks would then cut off unchecked. Allowed: compress.finetune_steps=0 (prune and score), or a "
            "checkpoint meta-trained with algo.outer_optimizer=adam."
        )


def continue_stream(experiment: "Experiment", start: int) -> None:
    """Meta-fine-tuning's meta-iteration i trains on the checkpoint's training stream at `start + i`: the tasks
    a longer training run would have seen next (a resume continues it at the trainer's step, as train does)."""
    datamodule = experiment.datamodule
    batch = datamodule.train_batch or experiment.sampler.train_batch

    def continued(seed: int, step: int, rank: int = 0, world_size: int = 1):
        return batch(seed, start + step, rank, world_size)

    datamodule.train_batch = continued


def score(experiment: "Experiment", scoring: Scoring, trainer, ckpt_path: str | None = None):
    """(summary, [tasks, steps + 1] per-task scores in task order) of the module on the fixed test tasks."""
    from metalearn_cli.interrupts import scoring_ends_on_sigterm

    with scoring_ends_on_sigterm(f"Run the compress command again to score {scoring.ckpt}.", speak=trainer.is_global_zero):
        trainer.test(experiment.module, datamodule=experiment.datamodule, verbose=False, ckpt_path=ckpt_path, weights_only=True)
    summary = copy.deepcopy(experiment.module.summaries["test"])
    return summary, in_task_order(experiment, scoring, trainer.world_size)


def save_checkpoint(trainer, path: Path) -> None:
    """The pruned network (masks in it) as a checkpoint `metalearn eval` and `metalearn compress` read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=True)
    if trainer.is_global_zero:
        tmp.replace(path)


def query_latency(experiment: "Experiment", dense_state: dict, task, repeats: int) -> dict:
    """Median CPU milliseconds of one forward pass of a task's queries through the network adapted to its support
    set, dense and compressed, timed alternately in this process."""
    import torch

    from metalearn_cli.algorithms.base import adapt
    from metalearn_cli.compression.footprint import side_by_side_ms
    from metalearn_cli.functional import FunctionalModel

    module = experiment.module.cpu()
    algorithm = experiment.algorithm
    task = task.to(torch.device("cpu"))

    def adapted(state: dict, pruning) -> torch.nn.Module:
        network = copy.deepcopy(module.model)
        network.load_state_dict(state)
        network.eval()
        fmodel = FunctionalModel(network, pruning)
        # ProtoNets and the fine-tune baselines classify with the initialisation's features (a new head is cheap)
        if algorithm.has_inner_loop and algorithm.head_fixes_ways:
            theta = {k: v.detach() for k, v in fmodel.params().items()}
            params, _ = adapt(fmodel.on("loop"), theta, task, algorithm.eval_inner_steps, algorithm.eval_optimizer(),
                              algorithm.inner_keys(fmodel))
            with torch.no_grad():
                for name, parameter in network.named_parameters():
                    parameter.copy_(params[name][0])
        return network

    queries = task.query_x[0]
    networks = {"dense": adapted(dense_state, None), "compressed": adapted(module.model.state_dict(), module.pruning)}

    def forward(network: torch.nn.Module):
        return lambda: network(queries)

    with torch.inference_mode():
        medians = side_by_side_ms({name: forward(net) for name, net in networks.items()}, repeats)
    return {**{name: round(ms, 4) for name, ms in medians.items()}, "repeats": repeats, "threads": torch.get_num_threads(),
            "queries": int(queries.shape[0]), "task": 0,
            "method": "median of timed forward passes of test task 0's queries through the adapted network, "
                      "dense and compressed alternating, on the CPU"}


def quantized_scores(experiment: "Experiment", scoring: Scoring, groups: list, repeats: int) -> dict:
    """Every test task adapted in float as evaluation adapts it (`Algorithm.adapted_network`), its network then
    quantized to int8 (`compression.quantization`) and both scored on the task's queries: the record's
    `quantization` section, with `per_task` {"float", "int8"} scores in task order (popped by the caller).
    Transductive batch norm is fixed with the query batch's statistics, as evaluation normalises the queries,
    and the activation ranges are observed on the same batch; other modes use the stored statistics and the
    support set."""
    import time

    import torch

    from metalearn_cli.compression.adapted import statistics_images
    from metalearn_cli.compression.footprint import side_by_side_ms
    from metalearn_cli.compression.quantization import SCHEME, engine, file_bytes, quantize_int8
    from metalearn_cli.stats import mean_ci95

    start = time.perf_counter()
    module = experiment.module.cpu().eval()
    algorithm, objective = experiment.algorithm, scoring.parts.source.objective
    transductive = any(getattr(layer, "mode", None) == "transductive" for layer in module.model.modules())
    bn_batch = "query" if transductive else "support"
    total = sum(group.num_tasks for group in groups)
    per_task = {"float": torch.empty(total), "int8": torch.empty(total)}
    print(f"quantizing {total} adapted networks to int8 ({engine()} kernels) and scoring each beside float ...", file=sys.stderr)
    index, first = 0, None
    for group in groups:
        group = group.to(torch.device("cpu"))
        for i in range(group.num_tasks):
            task = group.slice(i, i + 1)
            network = algorithm.adapted_network(module.fmodel, task, bn_batch)
            try:
                int8 = quantize_int8(network, statistics_images(task, bn_batch))
            except Exception as error:  # FX tracing or a missing int8 kernel: the model's structure, not the user's input
                raise MetalearnError(
                    f"`compress.quantize` = int8: the adapted network of model={scoring.choices.get('model')} "
                    f"({type(network).__name__}) could not be quantized ({type(error).__name__}: {error}). "
                    "Allowed: compress.quantize=null for this checkpoint."
                ) from None
            with torch.no_grad():
                for kind, net in (("float", network), ("int8", int8)):
                    per_task[kind][scoring.positions[index]] = objective.task_metric(net(task.query_x[0])[None], task.query_y)[0]
            if first is None:
                first = (network, int8, task.query_x[0])
            index += 1
    network, int8, queries = first
    with torch.inference_mode():
        latency = side_by_side_ms({"float": lambda: network(queries), "int8": lambda: int8(queries)}, repeats)
    float_mean, float_ci = mean_ci95(per_task["float"].double())
    int8_mean, int8_ci = mean_ci95(per_task["int8"].double())
    difference, difference_ci = mean_ci95(per_task["int8"].double() - per_task["float"].double())
    return {
        **SCHEME,
        "engine": engine(),
        "bn_batch": bn_batch,
        "calibration": f"each task's {bn_batch} images" + (" (transductive, as evaluation)" if transductive else ""),
        "float": {"mean": float_mean, "ci95": float_ci},
        "int8": {"mean": int8_mean, "ci95": int8_ci},
        "difference": {"mean": difference, "ci95": difference_ci, "of": "int8 minus float, task by task, after the last step"},
        "file_bytes": file_bytes(int8),
        "float_file_bytes": file_bytes(network),
        "file": "torch.save of test task 0's adapted network's state dict, int8 and float",
        "latency_ms": {**{name: round(ms, 4) for name, ms in latency.items()}, "repeats": repeats,
                       "threads": torch.get_num_threads(), "queries": int(queries.shape[0]), "task": 0},
        "seconds": round(time.perf_counter() - start, 1),
        "per_task": per_task,
    }


def compress(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise MetalearnError("`ckpt` is missing: name the checkpoint to compress, e.g. "
                             "`metalearn compress ckpt=outputs/<date>/<time>/checkpoints/best.ckpt compress.prune=0.75`.")
    settings = CompressSettings.of(cfg.compress)
    own, rest = split_overrides(list(HydraConfig.get().overrides.task))
    if cfg.ckpt_path is not None and not settings.finetune_steps:
        raise MetalearnError(
            f"`ckpt_path` = {str(cfg.ckpt_path)!r} resumes a meta-fine-tuning run, but `compress.finetune_steps` is 0. "
            "Repeat the compress command with its compress.finetune_steps and add ckpt_path=..."
        )
    scoring = prepare(cfg, rest)
    check_supported(scoring, settings)
    start = stream_start(scoring.checkpoint)
    run = finetune_config(scoring, cfg, own, settings, start)
    from metalearn_cli.config_checks import check_config

    check_config(run)
    if cfg.ckpt_path is not None:
        check_resume_of(cfg, run, scoring.choices, run_dir)
    from metalearn_cli.train import seed_everything

    seed_everything(int(run.seed))
    from metalearn_cli.build import build_trainer
    from metalearn_cli.compression.footprint import SPARSE_FORMAT, counts, dense_bytes, save_sparse
    from metalearn_cli.compression.pruning import sparsity
    from metalearn_cli.console import quiet_third_party
    from metalearn_cli.stats import format_table, mean_ci95
    from metalearn_cli.summary import describe_result, run_summary, write_task_scores

    quiet_third_party()
    experiment = scoring.experiment("Compress", run)
    module = experiment.module
    scoring.check_ways(experiment.algorithm)
    groups, rows = scoring.test_tasks()
    experiment.datamodule.set_fixed_tasks("test", groups)
    continue_stream(experiment, start)

    tester = build_trainer(scoring.run_cfg, None, experiment, training=False)
    dense, dense_scores = score(experiment, scoring, tester)
    dense_state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    dense_nonzero = counts(module.model)[1]
    try:
        masks = settings.pruning.masks(module.model, module.pruning)
    except options.OptionError as error:
        raise error.under("compress") from None
    module.prune(masks)

    steps, best_step, train_seconds = 0, None, 0.0
    if settings.finetune_steps:
        ckpt, trainer, steps, best_step, train_seconds = finetune(cfg, run, run_dir, experiment)
        compressed, scores = score(experiment, scoring, trainer, str(ckpt))
    elif settings.pruning.fraction == 0:  # quantize only: the network is the checkpoint's, already scored
        trainer, compressed, scores = tester, copy.deepcopy(dense), dense_scores.clone()
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        save_checkpoint(trainer, ckpt)
    else:
        trainer = build_trainer(scoring.run_cfg, None, experiment, training=False)
        compressed, scores = score(experiment, scoring, trainer)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        save_checkpoint(trainer, ckpt)
    if not trainer.is_global_zero:
        return compressed
    quantized = quantized_scores(experiment, scoring, groups, settings.latency_repeats) if settings.quantize else None

    pruned, prunable = sparsity(module.pruning)
    parameters, nonzero = counts(module.model)
    metric = compressed["metric"]
    difference, difference_ci = mean_ci95(scores[:, -1].double() - dense_scores[:, -1].double())
    state = module.model.state_dict()
    record = run_summary(experiment, scoring.run_cfg, scoring.choices, ckpt=ckpt, split="test",
                         scored={**scoring.record, "task_scores": TASK_SCORES})
    record.update(
        compression={
            "prune": float(settings.pruning.fraction),
            "structured": settings.pruning.structured,
            "method": settings.pruning.method,
            "pruned": "convolution and linear weights (not biases, not batch norm)",
            "masked_tensors": list(module.pruning.names),
            "finetune_steps": settings.finetune_steps,
            "quantize": settings.quantize,
            "steps": steps,
            "best_step": best_step,
            "train_seconds": round(train_seconds, 1),
            "stream_start": start,
            "source_ckpt": run.compress.source,
        },
        dense={**dense, "ckpt": run.compress.source},
        difference={"mean": difference, "ci95": difference_ci,
                    "of": f"compressed minus dense {metric} after {compressed['inner_steps']} steps, task by task"},
        sparsity=pruned / prunable,
        pruned_parameters=pruned,
        prunable_parameters=prunable,
        parameters=parameters,
        nonzero_parameters=nonzero,
        dense_nonzero_parameters=dense_nonzero,
        file_bytes=save_sparse(state, module.pruning.by_name(), run_dir / SPARSE_WEIGHTS),
        dense_file_bytes=dense_bytes(dense_state),
        file=SPARSE_WEIGHTS,
        file_format=SPARSE_FORMAT,
        latency_ms=query_latency(experiment, dense_state, groups[0].slice(0, 1), settings.latency_repeats),
        evaluated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    last = f"{metric}_step{compressed['inner_steps']}"
    for row, value in zip(rows, dense_scores[:, -1].numpy()):
        row[f"dense_{last}"] = str(value)  # numpy's shortest text, as the other columns
    if quantized is not None:
        per_task = quantized.pop("per_task")
        for kind in ("float", "int8"):
            for row, value in zip(rows, per_task[kind].numpy()):
                row[f"{kind}_{last}"] = str(value)
        record["quantization"] = quantized
    write_task_scores(run_dir / TASK_SCORES, metric, scores, rows)
    append_jsonl(run_dir / "evals.jsonl", record)
    write_json_atomic(run_dir / "test.json", record)
    write_json_atomic(run_dir / "eval.json", record)
    print(format_table(record))
    print(describe(record))
    print(f"{describe_result(record)} | wrote {run_dir / 'eval.json'}")
    return record


def describe(record: dict) -> str:
    """The record's comparison in three lines: accuracy, footprint, latency."""
    scale, unit = (100.0, "%") if record["metric"] == "acc" else (1.0, "")
    dense, diff, latency = record["dense"], record["difference"], record["latency_ms"]
    kind = "structured" if record["compression"]["structured"] else "unstructured"
    lines = []
    if "quantization" in record:
        q = record["quantization"]
        lines = [
            f"int8: float {q['float']['mean'] * scale:.4f}{unit} ± {q['float']['ci95'] * scale:.4f}{unit} -> int8 "
            f"{q['int8']['mean'] * scale:.4f}{unit} ± {q['int8']['ci95'] * scale:.4f}{unit}; paired difference "
            f"{q['difference']['mean'] * scale:+.4f}{unit} ± {q['difference']['ci95'] * scale:.4f}{unit} "
            f"(batch norm from the {q['bn_batch']} batch, {q['engine']} kernels)",
            f"int8: one adapted network {q['file_bytes']:,} bytes against {q['float_file_bytes']:,} in float "
            f"({q['float_file_bytes'] / q['file_bytes']:.2f}x smaller); CPU latency of {q['latency_ms']['queries']} queries: "
            f"float {q['latency_ms']['float']:.3f} ms, int8 {q['latency_ms']['int8']:.3f} ms "
            f"({q['latency_ms']['float'] / q['latency_ms']['int8']:.2f}x)",
        ]
    return "\n".join([
        f"dense {dense['mean'] * scale:.4f}{unit} ± {dense['ci95'] * scale:.4f}{unit} -> compressed "
        f"{record['mean'] * scale:.4f}{unit} ± {record['ci95'] * scale:.4f}{unit}; paired difference on the same "
        f"{record['num_tasks']} tasks {diff['mean'] * scale:+.4f}{unit} ± {diff['ci95'] * scale:.4f}{unit}",
        f"{record['sparsity']:.2%} of the convolution and linear weights zero ({kind}); nonzero parameters "
        f"{record['nonzero_parameters']:,} of {record['parameters']:,}; weights stored sparse {record['file_bytes']:,} bytes "
        f"against {record['dense_file_bytes']:,} dense ({record['dense_file_bytes'] / record['file_bytes']:.2f}x smaller)",
        f"CPU latency of {latency['queries']} queries: dense {latency['dense']:.3f} ms, compressed {latency['compressed']:.3f} ms "
        f"(median of {latency['repeats']}, {latency['threads']} threads)",
        *lines,
    ])


def finetune(cfg: DictConfig, run: DictConfig, run_dir: Path, experiment: "Experiment"):
    """Meta-train the pruned network as `metalearn train` trains (checkpoints, logs, validation, clean stops) for
    `compress.finetune_steps` meta-iterations. Returns (the checkpoint to score, the trainer, steps, best step,
    seconds)."""
    from metalearn_cli.build import build_trainer
    from metalearn_cli.train import fit_until_done_or_stopped

    trainer = build_trainer(run, run_dir, experiment, training=True)
    stop, checkpoints, seconds = fit_until_done_or_stopped(trainer, experiment, cfg.ckpt_path)
    if stop.requested or checkpoints.stopped:
        last = checkpoints.last_path
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
        if trainer.is_global_zero:
            print(f"Stopped by {stop.name or 'a signal to another rank'} after meta-iteration {trainer.global_step} of "
                  f"meta-fine-tuning; saved {last}. Resume with: metalearn compress "
                  f"{' '.join(shlex.quote(o) for o in [*overrides, f'ckpt_path={last}'])}", file=sys.stderr)
        sys.exit(128 + (stop.signal or signal.SIGTERM))
    held_out = experiment.source.validation_held_out
    best = checkpoints.best_path if held_out and checkpoints.best_path.exists() else checkpoints.last_path
    return best, trainer, int(trainer.global_step), checkpoints.best_step, seconds


@hydra.main(version_base="1.3", config_path="pkg://metalearn_cli.configs", config_name="compress")
@exits_cleanly
def _app(cfg: DictConfig) -> dict:
    return compress(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *with_training_groups(sys.argv[1:])]
    _app()


if __name__ == "__main__":
    main()
