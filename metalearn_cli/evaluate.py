"""`metalearn eval ckpt=PATH`: rebuild a run from the config saved in its checkpoint, score it on
fixed test tasks (mean and 95% CI after each inner step), print a table, write eval.json (the latest
result) into the run folder and append the result to its evals.jsonl (every evaluation, never
rewritten: scoring 5-shot after 1-shot does not lose the 1-shot number), and every task's score to
eval_tasks.csv there (for paired comparisons on the same tasks).

The tasks are the fixed test tasks of the checkpoint's own data, or of another data set
(`data=folder data.root=...`, `data=mnist`, ...: cross-domain evaluation, `metalearn_cli.cross_domain`),
or the episodes of a file (`eval.episodes=FILE`, `metalearn_cli.episodes`). Otherwise only evaluation
settings may differ from training (see EVAL_KEYS): asking for a different model or algorithm is
reported as a conflict instead of failing inside load_state_dict. The model is always built as it was
trained; tasks with another number of classes (`sampler.ways`, an episode file) are scored where the
algorithm classifies with a head of its own (ProtoNets, the fine-tune baselines) and refused where the
model's output layer fixes the classes (MAML and its kin).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from metalearn_cli.errors import MetalearnError, exits_cleanly
from metalearn_cli.run_folder import CHECKPOINT_KEY, append_jsonl, read_checkpoint, register_resolvers, run_dir_of_checkpoint, write_json_atomic

if TYPE_CHECKING:
    from metalearn_cli.build import Experiment, Parts
    from metalearn_cli.episodes import EpisodeFile
    from metalearn_cli.samplers import EpisodicSampler

#: keys (or key prefixes ending in '.') that `metalearn eval` may set differently from training
EVAL_KEYS = (
    "eval.",
    "sampler.shots",
    "sampler.queries",
    "sampler.ways",
    "algo.eval_inner_steps",
    "algo.eval_inner_lr",
    "algo.eval_inner_optimizer",
    "algo.eval_inner_batch_size",
    "algo.inner_params",
    "algo.vectorize",
    "algo.task_chunk",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.precision",
    "data.root",
    "data.cache_dir",
    "data.download",
)
#: data keys that say where the checkpoint's data set is, not which data set it is
LOCATION_KEYS = ("data.root", "data.cache_dir", "data.download")
#: taken from the eval command even when not overridden, so `metalearn eval` scores 600 tasks by default
EVAL_DEFAULTS = ("eval.num_tasks", "eval.batch_tasks")
#: keys of the command itself, not of the run (`out`: the file `metalearn episodes export` writes)
COMMAND_KEYS = ("ckpt", "out")
#: the per-task scores of the latest evaluation, beside eval.json
TASK_SCORES = "eval_tasks.csv"


def _allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVAL_KEYS)


@dataclass
class EvalRequest:
    """What an eval command line asks of a checkpoint."""

    #: the checkpoint's training config with the evaluation overrides applied
    run_cfg: DictConfig
    #: the config of another data set to score on (cross-domain), else None
    data: DictConfig | None = None
    #: its name: the `data=` choice
    data_name: str | None = None
    #: the data.* keys the command line sets, with their values
    data_keys: dict[str, Any] = field(default_factory=dict)


def eval_request(saved: DictConfig, composed: DictConfig, overrides: list[str], saved_choices: dict) -> EvalRequest:
    """The checkpoint's config with the user's evaluation overrides, and the data set to score on where it is
    another than the checkpoint's: another `data=` group, or data.* keys that define another data set
    (moving the same data, `data.root` and the like, is not another data set)."""
    merged = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))
    for key in EVAL_DEFAULTS:
        OmegaConf.update(merged, key, OmegaConf.select(composed, key), force_add=True)
    allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in EVAL_KEYS)
    parsed = [o for o in OverridesParser.create().parse_overrides(overrides)
              if o.key_or_group not in COMMAND_KEYS and not o.key_or_group.startswith("hydra")]
    trained = saved_choices.get("data")
    group = next((str(o.value()) for o in parsed if o.key_or_group == "data"), trained)
    data_keys = {o.key_or_group: _plain(OmegaConf.select(composed, o.key_or_group, default=None))
                 for o in parsed if o.key_or_group.startswith("data.")}
    redefined = [k for k, v in data_keys.items() if k not in LOCATION_KEYS and v != _plain(OmegaConf.select(merged, k, default=None))]
    other = group != trained or bool(redefined)
    for override in parsed:
        key = override.key_or_group
        if key == "data" or (other and key.startswith("data.")):
            continue  # the data scored on: its keys are its own, not the checkpoint's
        if key in saved_choices:  # a config group such as algo=..., model=...
            wanted = override.value()
            if wanted != saved_choices[key]:
                raise MetalearnError(
                    f"the checkpoint was trained with `{key}={saved_choices[key]}`; it cannot be evaluated with "
                    f"`{key}={wanted}`. Drop that override: the model and algorithm come from the checkpoint "
                    "(another data set to score it on may be named with `data=`)."
                )
            continue
        value = OmegaConf.select(composed, key, default=None)
        before = OmegaConf.select(merged, key, default=None)
        if _allowed(key):
            OmegaConf.update(merged, key, value, force_add=True)
        elif _plain(value) != _plain(before):
            raise MetalearnError(
                f"`{key}` cannot be changed at evaluation: the checkpoint was trained with {key}={_plain(before)!r} "
                f"and you asked for {_plain(value)!r}. Keys that can be changed at evaluation: {allowed}; "
                "and `data=` or data.* keys to score it on another data set."
            )
    if not other:
        return EvalRequest(merged)
    if group != trained:
        data = OmegaConf.create(_plain(composed.data))
    else:  # the same kind of source, defined otherwise (other classes, another split)
        data = OmegaConf.create(_plain(merged.data))
        for key, value in data_keys.items():
            OmegaConf.update(data, key[len("data."):], value, force_add=True)
    return EvalRequest(merged, data, group, data_keys)


def merge_eval_overrides(saved: DictConfig, composed: DictConfig, overrides: list[str], saved_choices: dict) -> DictConfig:
    """The training config of the checkpoint with the user's evaluation overrides applied."""
    return eval_request(saved, composed, overrides, saved_choices).run_cfg


#: config groups whose training choice `metalearn eval` composes with (see `with_training_groups`)
TRAINING_GROUPS = ("data", "algo", "model", "sampler", "trainer", "logger", "tuning")


def with_training_groups(args: list[str]) -> list[str]:
    """`args` plus `group=<choice>` for each config group of the checkpoint's training run that the
    command line does not name, so that the eval config is composed with the training run's algorithm,
    data and model: an override of a key only that algorithm has (Reptile's
    `algo.eval_inner_optimizer`) then composes instead of failing on the default algorithm's config.
    A `ckpt` that cannot be read is left to `evaluate`, which says why."""
    ckpts = [a.partition("=")[2] for a in args if a.startswith("ckpt=")]
    if len(ckpts) != 1 or "," in ckpts[0]:
        return args
    try:
        import torch

        choices = torch.load(Path(ckpts[0]).expanduser(), map_location="cpu", weights_only=True)[CHECKPOINT_KEY]["choices"]
    except Exception:
        return args
    named = {a.lstrip("+~").partition("=")[0] for a in args}
    extra = [f"{group}={choices[group]}" for group in TRAINING_GROUPS if choices.get(group) and group not in named]
    return [*args, *extra]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@dataclass
class Scoring:
    """A checkpoint's run rebuilt as it was trained, and the tasks to score it on."""

    ckpt: str
    checkpoint: dict
    choices: dict
    #: the checkpoint's config with the evaluation overrides
    run_cfg: DictConfig
    #: the same with the checkpoint's own sampler: what the model, its head and the algorithm are built from
    build_cfg: DictConfig
    #: the checkpoint's data source, sampler, algorithm and model, as trained
    parts: "Parts"
    #: draws the fixed test tasks (of the checkpoint's data, or of another data set); None with an episode file
    sampler: "EpisodicSampler | None"
    episodes: "EpisodeFile | None"
    #: what the record says about the tasks scored (see summary.run_summary's `scored`)
    record: dict
    #: each scored task's place (the groups of `test_tasks` laid end to end) among the fixed tasks or the file's episodes
    positions: list[int] = field(default_factory=list)

    @property
    def task_seed(self) -> int:
        return int(self.run_cfg.eval.task_seed)

    def experiment(self, verb: str, cfg: DictConfig | None = None) -> "Experiment":
        """The checkpoint's run built from `cfg` (default: `build_cfg`) with the checkpoint's weights loaded;
        weights that do not fit the user's overrides are a clean error (`verb`: what the command does)."""
        from metalearn_cli.build import build_experiment

        experiment = build_experiment(self.build_cfg if cfg is None else cfg, self.choices, self.parts)
        try:
            experiment.module.load_state_dict(self.checkpoint["state_dict"])
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:300]
            raise MetalearnError(
                f"the weights in `ckpt` = {self.ckpt!r} do not fit the model built from its config with your overrides "
                f"({detail}). {verb} with the training run's model settings."
            ) from None
        return experiment

    def check_ways(self, algorithm) -> None:
        """Tasks with another number of classes than the model's output layer has are refused where the
        algorithm scores through that layer (after `extra_modules`: the fine-tune baselines build their
        classifier there)."""
        source = self.parts.source
        if source.objective.name != "classification" or not algorithm.head_fixes_ways:
            return
        head = source.output_dim(self.build_cfg.sampler.ways)
        which = f"the checkpoint's model (algo={self.choices.get('algo')}) scores with its own output layer of {head} classes"
        others = "ProtoNets and the fine-tune baselines (algo=protonet, finetune) classify any number of classes"
        if self.episodes is not None:
            from metalearn_cli.episodes import line_error

            wrong = next((e for e in self.episodes.episodes if e.ways != head), None)
            if wrong is not None:
                raise line_error(self.episodes.path, "eval.episodes", wrong.line,
                                 f"the episode has N = {wrong.ways} classes, but {which}, so it takes {head}-way episodes only ({others})",
                                 format_hint=False)
        elif self.sampler.ways != head:
            raise MetalearnError(f"`sampler.ways` = {self.sampler.ways}, but {which}. Allowed: {head} ({others}).")

    def test_tasks(self) -> tuple[list, list[dict]]:
        """The groups of test tasks (each of one shape) and, for each task in scoring order (the groups laid
        end to end), its row of eval_tasks.csv; `positions[i]`: the task's place in the file or the task list."""
        if self.episodes is None:
            tasks = self.sampler.fixed_tasks("test", int(self.run_cfg.eval.num_tasks), self.task_seed)
            support, query = tasks.support_size, getattr(tasks, "query_size", None) or tasks.query_x.shape[1]
            self.positions = list(range(tasks.num_tasks))
            return [tasks], [{"task": i, "ways": self.sampler.ways, "support": support, "query": query} for i in self.positions]
        from metalearn_cli.episodes import load_episode_tasks

        source = self.parts.source
        loaded = load_episode_tasks(self.episodes, tuple(source.input_shape), source.inputs, self.task_seed)
        self.record["episodes"].update(images=loaded.images, images_sha256=loaded.images_sha256)
        self.positions = [p for group in loaded.groups for p in group.positions]
        rows = []
        for p in range(len(self.episodes.episodes)):
            episode = self.episodes.episodes[p]
            ways, support, query = episode.shape
            rows.append({"task": p, "line": episode.line, "ways": ways, "support": support, "query": query})
        return loaded.groups, rows


def prepare(cfg: DictConfig, overrides: list[str], episodes_allowed: bool = True) -> Scoring:
    """Everything `metalearn eval` (and `metalearn episodes export`) needs before Lightning: the checkpoint,
    the overrides checked, its data source, sampler, algorithm and model built as trained, and the test
    tasks' source and sampler, or the episode file, checked."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise MetalearnError("`ckpt` is missing: name the checkpoint to score, e.g. `metalearn eval ckpt=outputs/<date>/<time>/checkpoints/last.ckpt`.")
    checkpoint = read_checkpoint(cfg.ckpt, "ckpt")  # torch only; Lightning comes after every check
    saved = OmegaConf.create(checkpoint[CHECKPOINT_KEY]["config"])
    choices = dict(checkpoint[CHECKPOINT_KEY].get("choices", {}))
    request = eval_request(saved, cfg, overrides, choices)
    run_cfg = request.run_cfg
    episodes_path = OmegaConf.select(run_cfg, "eval.episodes", default=None)
    episodes = None
    if episodes_path is not None:
        if not episodes_allowed:
            raise MetalearnError("`eval.episodes` names tasks to score; exporting writes the fixed test tasks of a run. Drop `eval.episodes`.")
        if request.data is not None:
            raise MetalearnError(
                f"`eval.episodes` = {episodes_path!r} and `data={request.data_name}` (or other data.* keys) both name the tasks "
                "to score: an episode file's images go through the checkpoint's own preprocessing. Drop one of them."
            )
        from metalearn_cli.episodes import describe_shapes, read_episode_file

        episodes = read_episode_file(episodes_path)
    from metalearn_cli.build import build_part, build_tasks
    from metalearn_cli.config_checks import check_against_data

    build_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))
    build_cfg.sampler = OmegaConf.create(_plain(saved.sampler))
    parts = build_tasks(build_cfg)
    trained = choices.get("data") or parts.source.name
    record: dict = {"data": trained, "trained_on": trained}
    scoring = Scoring(str(cfg.ckpt), checkpoint, choices, run_cfg, build_cfg, parts, None, episodes, record)
    if episodes is not None:
        if not hasattr(parts.source, "inputs"):
            raise MetalearnError(
                f"`eval.episodes` holds image classification episodes, but the checkpoint was trained on {trained}, "
                f"{parts.source.objective.name} on inputs of shape {tuple(parts.source.input_shape)}. Score an image "
                "classification checkpoint on it."
            )
        record.update(data="episodes", episodes={"file": str(episodes.path), "sha256": episodes.sha256, "count": len(episodes.episodes)},
                      **describe_shapes(episodes.episodes))
        return scoring
    source = parts.source
    if request.data is not None:
        from metalearn_cli.cross_domain import check_kind_before_loading, fit_to_checkpoint, fitted_data_config

        check_kind_before_loading(request.data.get("_target_"), parts.source, request.data_name, trained)
        data_cfg = fitted_data_config(request.data, parts.source, request.data_keys, request.data_name)
        source = build_part(OmegaConf.create({"data": data_cfg}), "data")
        note = fit_to_checkpoint(source, parts.source, request.data_name, trained)
        record.update(data=request.data_name, data_source=source.describe() + (f" ({note})" if note else ""),
                      data_config=_plain(data_cfg))
    sampler = build_part(run_cfg, "sampler", source=None)
    sampler.source = source
    check_against_data(run_cfg, source.objective)
    if hasattr(source, "check_task_shape"):
        source.check_task_shape({"test": sampler.ways}, {"test": sampler.shots}, sampler.queries)
    scoring.sampler = sampler
    record.update(ways=sampler.ways, shots=sampler.shots, queries=sampler.queries)
    return scoring


def evaluate(cfg: DictConfig) -> dict:
    scoring = prepare(cfg, list(HydraConfig.get().overrides.task))
    from metalearn_cli.build import build_trainer
    from metalearn_cli.console import quiet_third_party
    from metalearn_cli.interrupts import scoring_ends_on_sigterm
    from metalearn_cli.stats import format_table
    from metalearn_cli.summary import describe_result, run_summary, write_task_scores

    quiet_third_party()
    experiment = scoring.experiment("Evaluate")
    scoring.check_ways(experiment.algorithm)
    groups, rows = scoring.test_tasks()
    experiment.datamodule.set_fixed_tasks("test", groups)
    trainer = build_trainer(scoring.run_cfg, None, experiment, training=False)
    with scoring_ends_on_sigterm(f"Run it again to score {cfg.ckpt}.", speak=trainer.is_global_zero):
        trainer.test(experiment.module, datamodule=experiment.datamodule, verbose=False)
    summary = run_summary(experiment, scoring.run_cfg, scoring.choices, ckpt=cfg.ckpt, split="test",
                          scored={**scoring.record, "task_scores": TASK_SCORES})
    if trainer.is_global_zero:
        run_dir = run_dir_of_checkpoint(cfg.ckpt)
        summary["evaluated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_task_scores(run_dir / TASK_SCORES, summary["metric"], in_task_order(experiment, scoring, trainer.world_size), rows)
        append_jsonl(run_dir / "evals.jsonl", summary)  # the history first: eval.json is replaced
        write_json_atomic(run_dir / "eval.json", summary)
        print(format_table(summary))
        if scoring.episodes is not None:
            print(f"scored on the {len(scoring.episodes.episodes)} episodes of {scoring.episodes.path}; trained on data={summary['trained_on']}")
        elif "data_config" in scoring.record:
            print(f"scored on the test classes of data={summary['data']} ({scoring.record['data_source']}, as "
                  f"{'x'.join(map(str, scoring.parts.source.input_shape))} inputs); trained on data={summary['trained_on']}")
        print(f"{describe_result(summary)} | wrote {run_dir / 'eval.json'} (all evaluations: {run_dir / 'evals.jsonl'})")
    return summary


def in_task_order(experiment, scoring: Scoring, world: int):
    """The module's per-task scores (gathered rank after rank, group after group) in the order of the tasks:
    fixed task i, or the file's episode i."""
    gathered = experiment.module.task_scores["test"]
    order = experiment.datamodule.scored_order("test", world)
    ordered = gathered.new_empty(gathered.shape)
    ordered[[scoring.positions[i] for i in order]] = gathered
    return ordered


register_resolvers()


@hydra.main(version_base="1.3", config_path="pkg://metalearn_cli.configs", config_name="eval")
@exits_cleanly
def _app(cfg: DictConfig) -> dict:
    return evaluate(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *with_training_groups(sys.argv[1:])]
    _app()


if __name__ == "__main__":
    main()
