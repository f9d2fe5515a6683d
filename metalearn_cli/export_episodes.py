"""`metalearn episodes export ckpt=PATH out=FILE`: the fixed test tasks `metalearn eval` scores, as an
episode file (`metalearn_cli.episodes`) with their images as PNG files, so that other tools can be
scored on exactly our tasks, and ours on theirs.

The tasks are those of `metalearn eval` with the same overrides (`eval.num_tasks`, `eval.task_seed`,
`sampler.ways/shots/queries`, `data=` for another data set's). Each image is written as the model saw
it before its inputs were made: resized, in the checkpoint's channels, rotated where the task's class is
a rotation (Omniglot), not inverted (`ImageTasks.pixels_of`); scoring the file with `metalearn eval
eval.episodes=FILE` gives the same inputs, bit for bit, so the same per-task scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metalearn_cli.errors import MetalearnError, exits_cleanly
from metalearn_cli.evaluate import prepare, with_training_groups
from metalearn_cli.run_folder import register_resolvers


def export(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "out") or not cfg.out:
        raise MetalearnError("`out` is missing: name the episode file to write, e.g. `out=episodes/omniglot-test.jsonl`.")
    out = Path(str(cfg.out)).expanduser().absolute()
    if out.exists():
        raise MetalearnError(f"`out` = {str(cfg.out)!r} already exists; an episode file is never overwritten. "
                             "Name a new file, or delete that one (and its _images folder) first.")
    scoring = prepare(cfg, list(HydraConfig.get().overrides.task), episodes_allowed=False)
    source = scoring.sampler.source
    if not hasattr(source, "pixels_of"):
        raise MetalearnError(
            f"episode files hold image classification tasks, but the tasks of this checkpoint are {scoring.record['data']}'s, "
            f"{source.objective.name} on inputs of shape {tuple(source.input_shape)}. Export a checkpoint trained on images."
        )
    from metalearn_cli.episodes import write_episode_file

    tasks = scoring.sampler.fixed_tasks("test", int(scoring.run_cfg.eval.num_tasks), scoring.task_seed)
    names = source.splits["test"].class_names
    class_names = [[names[c] for c in row] for row in tasks.classes.tolist()] if tasks.classes is not None else None
    count, images = write_episode_file(out, tasks, source.pixels_of, class_names)
    sampler = scoring.sampler
    print(f"wrote {count} episodes of {scoring.record['data']}'s test classes ({sampler.ways}-way {sampler.shots}-shot, "
          f"{sampler.queries} queries per class, eval.task_seed={scoring.task_seed}) to {out}, with {images} images in "
          f"{out.parent / (out.stem + '_images')}. Score a checkpoint on them: metalearn eval ckpt=... eval.episodes={out}")
    return {"file": str(out), "episodes": count, "images": images}


register_resolvers()
OmegaConf.register_new_resolver(
    "metalearn_parent", lambda path: str(Path(path).expanduser().absolute().parent) if path else ".", replace=True
)


@hydra.main(version_base="1.3", config_path="pkg://metalearn_cli.configs", config_name="episodes_export")
@exits_cleanly
def _app(cfg: DictConfig) -> dict:
    return export(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *with_training_groups(sys.argv[1:])]
    _app()


if __name__ == "__main__":
    main()
