"""Checks of a composed config, so bad input fails before any work with a message that names
the key, the value and what is allowed."""

from __future__ import annotations

from typing import Any

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from metalearn_cli.errors import MetalearnError
from metalearn_cli.options import integer, invalid

if TYPE_CHECKING:
    from metalearn_cli.tasks import Objective

# This module imports neither torch nor Lightning, so a mistyped value is reported in a second.
# It checks the keys that belong to the run itself (seed, trainer steps, evaluation, checkpoints);
# every other class checks its own settings when it is built (metalearn_cli.options).


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise invalid(key, value, allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(cfg: DictConfig, key: str, meaning: str, optional: bool = False, minimum: int = 1) -> None:
    integer(key, _value(cfg, key), meaning, minimum, optional)


def check_config(cfg: DictConfig) -> None:
    """Checks of the run's own keys (run before anything is built)."""
    positive_int(cfg, "seed", "the seed of model initialisation and task sampling", minimum=0)
    positive_int(cfg, "trainer.max_steps", "meta-iterations to train; 0 scores the initialisation", minimum=0)
    positive_int(cfg, "eval.num_tasks", "test tasks to score")
    positive_int(cfg, "eval.val_tasks", "validation tasks to score")
    positive_int(cfg, "eval.batch_tasks", "tasks evaluated together")
    positive_int(cfg, "eval.task_seed", "the seed that fixes validation and test tasks", minimum=0)
    positive_int(cfg, "checkpoint.every_n_steps", "meta-iterations between saves of last.ckpt", optional=True, minimum=0)
    iterations_per_batch(cfg)


def tuning_options() -> list[str]:
    """The files of the `tuning` config group (configs/tuning/<algo>_<data>.yaml), by name."""
    from pathlib import Path

    import metalearn_cli.configs

    return sorted(p.stem for p in (Path(metalearn_cli.configs.__file__).parent / "tuning").glob("*.yaml"))


def check_tuning_override(overrides: list[str], options: list[str]) -> None:
    """`tuning` is an optional group picked as `${algo}_${data}`, so Hydra silently skips a name with
    no file: a typo in an explicit `tuning=NAME` would run without the published settings."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "tuning" and value not in options:
            raise MetalearnError(
                f"invalid value for `tuning`: {value!r}: there is no configs/tuning/{value}.yaml. Allowed: "
                f"{', '.join(options)} (or leave `tuning` out: it is picked from algo and data when such a file "
                "exists; `~tuning` runs without one)."
            )


def check_against_data(cfg: DictConfig, objective: "Objective") -> None:
    """Checks that depend on the kind of task (classification needs ways and queries)."""
    if objective.name == "classification":
        for key, meaning in (("sampler.ways", "classes per task"), ("sampler.queries", "query examples per class")):
            if _value(cfg, key) is None:
                raise MetalearnError(
                    f"`{key}` is missing: classification tasks need {meaning}. "
                    f"Set it on the command line, e.g. `{key}=5`."
                )
    elif _value(cfg, "sampler.queries") is None:
        raise MetalearnError("`sampler.queries` is missing: each task needs query points to be scored. Set e.g. `sampler.queries=10`.")


def iterations_per_batch(cfg: DictConfig) -> int:
    """How many meta-iterations one Lightning training step runs (the `iterations_per_batch` key).

    Lightning's bookkeeping around a training step costs about half a millisecond on a CPU, a fifth
    of a sinusoid meta-iteration, so small models run several meta-iterations per step. `auto` is 10
    for the MLP and 1 otherwise (a conv4 meta-iteration takes hundreds of milliseconds), reduced to
    the largest number that divides every cadence counted in meta-iterations, so validation,
    logging and checkpoints happen at exactly the steps the config names."""
    value = _value(cfg, "iterations_per_batch")
    cadences = {
        key: _value(cfg, key)
        for key in ("trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps", "checkpoint.every_n_steps")
    }
    cadences = {key: v for key, v in cadences.items() if _is_int(v) and v > 0}
    if value is None or value == "auto":
        model = str(_value(cfg, "model._target_") or "")
        chosen = 10 if model.endswith(".MLP") else 1
        while any(v % chosen for v in cadences.values()):
            chosen -= 1
        return chosen
    if not _is_int(value) or value < 1:
        _fail("iterations_per_batch", value, "auto, or an integer >= 1 (meta-iterations per Lightning training step)")
    bad = {key: v for key, v in cadences.items() if v % value}
    if bad:
        named = ", ".join(f"`{key}` = {v}" for key, v in bad.items())
        raise MetalearnError(
            f"invalid value for `iterations_per_batch`: {value!r}. It must divide {named}, so that validation, "
            "logging, checkpoints and the end of training fall on the meta-iterations the config names. Allowed: auto, or a common "
            "divisor of those values."
        )
    return value


#: config groups a resumed run must share with its checkpoint: another choice is another experiment
RESUME_GROUPS = ("data", "algo", "model")


def check_resume(saved_config: dict, saved_choices: dict, cfg: DictConfig, choices: dict, ckpt: str,
                 run_dirs: tuple[str, str] = ("", "")) -> list[str]:
    """Before resuming from `ckpt`: refuse another data set, algorithm or model than the checkpoint's
    run had, and return the other settings that differ (`key: old -> new`). Those may change on purpose
    (trainer.max_steps to train longer), but the user should see them: a resume continues the run
    exactly only under the same settings, and Reptile's meta step anneals over trainer.max_steps.
    `run_dirs` (the checkpoint's run folder, this run's): paths inside them count as the same (the
    loggers write into the run folder, which a resume never reuses)."""
    for group in RESUME_GROUPS:
        old, new = saved_choices.get(group), choices.get(group)
        if old is not None and old != new:
            raise MetalearnError(
                f"`ckpt_path` = {ckpt!r} was trained with `{group}={old}`, but this command composes `{group}={new}`. "
                f"A resume continues the same run: repeat the training command's overrides (its run folder's "
                f".hydra/overrides.yaml lists them) and add `ckpt_path=...`."
            )
    before, now = _flatten(saved_config), _flatten(OmegaConf.to_container(cfg, resolve=True))
    absent = object()
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, absent), now.get(key, absent)
        if key == "ckpt_path" or old == new or (old is absent and new is None):  # None: a key added since, at its default
            continue
        if isinstance(old, str) and isinstance(new, str) and all(run_dirs) and (
            old.replace(run_dirs[0], "<run>", 1) == new.replace(run_dirs[1], "<run>", 1)
        ):
            continue
        changed.append(f"{key}: {'(absent)' if old is absent else repr(old)} -> {'(absent)' if new is absent else repr(new)}")
    return changed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
