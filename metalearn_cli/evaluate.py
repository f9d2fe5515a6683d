"""`metalearn eval ckpt=PATH`: rebuild a run from the config saved in its checkpoint, score it on
fixed test tasks (mean and 95% CI after each inner step), print a table, write eval.json (the latest
result) into the run folder and append the result to its evals.jsonl (every evaluation, never
rewritten: scoring 5-shot after 1-shot does not lose the 1-shot number).

Only evaluation settings may differ from training (see EVAL_KEYS); asking for a different model,
data set or algorithm is reported as a conflict instead of failing inside load_state_dict.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from metalearn_cli.errors import MetalearnError, exits_cleanly
from metalearn_cli.run_folder import CHECKPOINT_KEY, append_jsonl, read_checkpoint, register_resolvers, run_dir_of_checkpoint, write_json_atomic

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
#: taken from the eval command even when not overridden, so `metalearn eval` scores 600 tasks by default
EVAL_DEFAULTS = ("eval.num_tasks", "eval.batch_tasks")


def _allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVAL_KEYS)


def merge_eval_overrides(saved: DictConfig, composed: DictConfig, overrides: list[str], saved_choices: dict) -> DictConfig:
    """The training config of the checkpoint with the user's evaluation overrides applied."""
    merged = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))
    for key in EVAL_DEFAULTS:
        OmegaConf.update(merged, key, OmegaConf.select(composed, key), force_add=True)
    allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in EVAL_KEYS)
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "ckpt" or key.startswith("hydra"):
            continue
        if key in saved_choices:  # a config group such as algo=..., data=...
            wanted = override.value()
            if wanted != saved_choices[key]:
                raise MetalearnError(
                    f"the checkpoint was trained with `{key}={saved_choices[key]}`; it cannot be evaluated with "
                    f"`{key}={wanted}`. Drop that override: the model, data and algorithm come from the checkpoint."
                )
            continue
        value = OmegaConf.select(composed, key, default=None)
        before = OmegaConf.select(merged, key, default=None)
        if _allowed(key):
            OmegaConf.update(merged, key, value, force_add=True)
        elif _plain(value) != _plain(before):
            raise MetalearnError(
                f"`{key}` cannot be changed at evaluation: the checkpoint was trained with {key}={_plain(before)!r} "
                f"and you asked for {_plain(value)!r}. Keys that can be changed at evaluation: {allowed}."
            )
    return merged


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


def evaluate(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise MetalearnError("`ckpt` is missing: name the checkpoint to score, e.g. `metalearn eval ckpt=outputs/<date>/<time>/checkpoints/last.ckpt`.")
    checkpoint = read_checkpoint(cfg.ckpt, "ckpt")  # torch only; Lightning comes after every check
    record = checkpoint[CHECKPOINT_KEY]
    saved = OmegaConf.create(record["config"])
    choices = dict(record.get("choices", {}))
    run_cfg = merge_eval_overrides(saved, cfg, list(HydraConfig.get().overrides.task), choices)
    from metalearn_cli.build import build_experiment, build_tasks, build_trainer
    from metalearn_cli.console import quiet_third_party
    from metalearn_cli.interrupts import scoring_ends_on_sigterm
    from metalearn_cli.stats import format_table
    from metalearn_cli.summary import describe_result, run_summary

    tasks = build_tasks(run_cfg)
    quiet_third_party()
    experiment = build_experiment(run_cfg, choices, tasks)
    try:
        experiment.module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise MetalearnError(
            f"the weights in `ckpt` = {cfg.ckpt!r} do not fit the model built from its config with your overrides "
            f"({detail}). Evaluate with the training run's sampler.ways and model settings."
        ) from None
    trainer = build_trainer(run_cfg, None, experiment, training=False)
    with scoring_ends_on_sigterm(f"Run it again to score {cfg.ckpt}.", speak=trainer.is_global_zero):
        trainer.test(experiment.module, datamodule=experiment.datamodule, verbose=False)
    summary = run_summary(experiment, run_cfg, choices, ckpt=cfg.ckpt, split="test")
    if trainer.is_global_zero:
        run_dir = run_dir_of_checkpoint(cfg.ckpt)
        summary["evaluated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        append_jsonl(run_dir / "evals.jsonl", summary)  # the history first: eval.json is replaced
        write_json_atomic(run_dir / "eval.json", summary)
        print(format_table(summary))
        print(f"{describe_result(summary)} | wrote {run_dir / 'eval.json'} (all evaluations: {run_dir / 'evals.jsonl'})")
    return summary


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
