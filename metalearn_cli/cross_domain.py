"""Scoring a checkpoint on another data set than the one it was trained on (cross-domain evaluation, as
in Chen et al. 2019: miniImageNet to CUB; here also Omniglot to a folder of a user's scans).

The model, the algorithm and the sampler come from the checkpoint; the test tasks come from the other
data source, made with the checkpoint's input size and channels. The source's `image_size` (and its
`channels`, where it has that key) are set to the checkpoint's before it is built, so it decodes and
resizes its own files as it always does; a source whose images still have other channels (Omniglot and
MNIST are grey, CIFAR-FS and miniImageNet RGB) is converted grey <-> RGB as Pillow converts a file.
Whether pixels are inverted is the scored source's own convention (Omniglot's strokes are; a folder's
images are not). Only what cannot fit is refused: another kind of task (a regression checkpoint on
images), images for a model of other inputs, a size the source cannot be set to.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from metalearn_cli.errors import MetalearnError


def _kind(objective_name: str, input_shape: tuple) -> str:
    if len(input_shape) == 3:
        c, h, w = input_shape
        return f"{objective_name} of {'grey' if c == 1 else 'RGB' if c == 3 else f'{c}-channel'} {h}x{w} images"
    return f"{objective_name} on inputs of shape {tuple(input_shape)}"


def fitted_data_config(data: DictConfig, trained, explicit: dict[str, Any], name: str) -> DictConfig:
    """`data` (the config of the source to score on) with the checkpoint's image size and channels.
    `explicit`: the data.* keys the user set, with their values: one that contradicts the checkpoint is an error."""
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=False))
    for key, value in OmegaConf.to_container(data, resolve=False).items():
        if OmegaConf.is_missing(data, key):
            raise MetalearnError(f"`data.{key}` is missing: `data={name}` needs it to find the data to score the checkpoint on. "
                                 f"Set it on the command line, e.g. `data.{key}=...`.")
    shape = tuple(trained.input_shape)
    if len(shape) != 3:
        return data
    wanted = {"image_size": shape[1], "channels": shape[0]}
    for key, value in wanted.items():
        if key not in data:
            continue
        asked = explicit.get(f"data.{key}")
        if asked is not None and asked != value:
            raise MetalearnError(
                f"`data.{key}` = {asked!r}, but the checkpoint's model takes {_kind(trained.objective.name, shape)}: "
                f"the data it is scored on is made with its {key.replace('_', ' ')}, {value}. Drop `data.{key}` "
                "(it is set to the checkpoint's)."
            )
        data[key] = value
    return data


def check_kind_before_loading(target: str | None, trained, name: str, trained_name: str) -> None:
    """Refuse another kind of task from the source's class alone, before it reads any data."""
    if not target:
        return
    try:
        from hydra.utils import get_class

        objective = getattr(get_class(target), "objective", None)
    except Exception:  # a target that does not import is reported when it is built
        return
    if objective is not None and objective.name != trained.objective.name:
        _refuse_kind(objective.name, None, trained, name, trained_name)


def _refuse_kind(kind: str, shape: tuple | None, trained, name: str, trained_name: str) -> None:
    gives = f"{kind} tasks" + (f" ({_kind(kind, shape)})" if shape is not None else "")
    raise MetalearnError(
        f"`data={name}` gives {gives}, but the checkpoint was trained on {trained_name}: "
        f"{_kind(trained.objective.name, tuple(trained.input_shape))}. A checkpoint can be scored only on tasks of its own "
        f"kind, with inputs its model takes: drop `data={name}`, or score a checkpoint trained on {kind} data."
    )


def fit_to_checkpoint(source, trained, name: str, trained_name: str) -> str:
    """Make `source`'s inputs those of the checkpoint's model (converting grey <-> RGB), or refuse what
    cannot fit. Returns how the images were changed, for the record ("" where they were not)."""
    if source.objective.name != trained.objective.name:
        _refuse_kind(source.objective.name, tuple(source.input_shape), trained, name, trained_name)
    want, have = tuple(trained.input_shape), tuple(source.input_shape)
    note = ""
    if len(want) == 3 and len(have) == 3 and want[0] != have[0] and hasattr(source, "convert_channels"):
        if {want[0], have[0]} != {1, 3}:
            raise MetalearnError(f"`data={name}` gives {have[0]}-channel images and the checkpoint's model takes "
                                 f"{want[0]}-channel ones; only grey (1) and RGB (3) convert into each other.")
        source.convert_channels(want[0])
        note = f"{'grey' if have[0] == 1 else 'RGB'} images converted to {'grey' if want[0] == 1 else 'RGB'}"
        have = tuple(source.input_shape)
    if have != want:
        what = "its images" if len(have) == 3 else "its inputs"
        raise MetalearnError(
            f"`data={name}` gives inputs of shape {have}, but the checkpoint's model (trained on {trained_name}) takes "
            f"{want}: {what} cannot be made to fit"
            + (" (the source has no `data.image_size` to set)" if len(have) == 3 and len(want) == 3 else "")
            + ". Score it on data with inputs of that shape."
        )
    return note
