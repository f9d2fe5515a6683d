"""The run folder: where a run's files go, and how they are written without losing anything."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from metalearn_cli.errors import MetalearnError, report

#: key under which a metalearn checkpoint keeps the run's config (how `eval` rebuilds the run)
CHECKPOINT_KEY = "metalearn"


def run_dir_of_checkpoint(ckpt: str | os.PathLike) -> Path:
    """`<run>/checkpoints/last.ckpt` -> `<run>`; a checkpoint elsewhere -> its own folder."""
    path = Path(ckpt).expanduser().absolute()
    parent = path.parent
    return parent.parent if parent.name == "checkpoints" else parent


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: Any) -> None:
    """Append `record` as one line of JSON to `path`, under an exclusive lock and flushed to disk, so
    concurrent writers never interleave and earlier lines are never rewritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable(folder: Path, key: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise MetalearnError(
            f"the output folder `{key}` = {str(folder)!r} cannot be written ({error.strerror or error}). "
            f"Choose a folder you can write to, e.g. `{key}=outputs/my_run`."
        ) from None


#: marker a process creates (O_EXCL) to own a run or sweep folder
CLAIM = ".metalearn-claim"


def claim_folder(path: Path) -> bool:
    """Atomically take `path` for this process: False if another process already took it."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


class RunFolderGuard(Callback):
    """Hydra callback that takes the output folder before Hydra writes anything into it.

    * A folder is claimed atomically, so two runs (or sweeps) started in the same second never share
      `outputs/<date>/<time>/` (Hydra issue 2925): the later one gets `<time>-1`, `<time>-2`, ...
    * A folder named explicitly with `hydra.run.dir=` that already holds a run is refused: metalearn
      never overwrites an earlier run's config or checkpoints.
    * A folder that cannot be written is reported before anything starts.
    """

    def __init__(self, refuse_existing_run: bool = True) -> None:
        self.refuse_existing_run = refuse_existing_run

    @staticmethod
    def _explicit(config: DictConfig, key: str) -> bool:
        overrides = OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or []
        return any(str(o).lstrip("+~").startswith(f"{key}=") for o in overrides)

    def _take(self, config: DictConfig, key: str, is_run: bool) -> None:
        path = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
        try:
            if not self.refuse_existing_run:
                ensure_writable(path, key)
                return
            explicit = self._explicit(config, key)
            if is_run and explicit and (path / ".hydra" / "config.yaml").exists():
                raise MetalearnError(
                    f"`{key}` = {str(path)!r} already holds a run; metalearn never overwrites one. "
                    "Leave hydra.run.dir unset for a fresh dated folder, or name a new folder. "
                    "To continue that run, pass `ckpt_path=<run>/checkpoints/last.ckpt` (it continues in a new folder)."
                )
            candidate, n = path, 0
            while not claim_folder(candidate):
                if explicit:
                    raise MetalearnError(
                        f"`{key}` = {str(path)!r} is already used by another run or sweep; metalearn never writes "
                        f"two runs into one folder. Name a new folder, or leave {key} unset for a fresh dated one."
                    )
                n += 1  # a dated folder taken in the same second: the next free one
                candidate = path.with_name(f"{path.name}-{n}")
            ensure_writable(candidate, key)
        except MetalearnError as error:
            report(error)
            sys.exit(2)
        except OSError as error:
            report(MetalearnError(f"the output folder `{key}` = {str(path)!r} cannot be written ({error.strerror or error})."))
            sys.exit(2)
        with read_write(config), open_dict(config):  # a concrete path: sweep workers must not re-evaluate ${now:...}
            OmegaConf.update(config, key, str(candidate))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
            return  # a DDP rank started by Lightning inside the run folder of rank 0
        self._take(config, "hydra.run.dir", is_run=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._take(config, "hydra.sweep.dir", is_run=False)


def read_checkpoint(path: str | os.PathLike, key: str) -> dict:
    """Load a metalearn checkpoint on the CPU, or explain clearly why `path` is not one."""
    file = Path(str(path)).expanduser()
    example = f"`{key}=outputs/<date>/<time>/checkpoints/last.ckpt`"
    if not file.exists():
        raise MetalearnError(f"`{key}` = {str(path)!r} does not exist. Pass a checkpoint written by `metalearn train`, e.g. {example}.")
    if not file.is_file():
        raise MetalearnError(f"`{key}` = {str(path)!r} is a folder, not a checkpoint file. Pass e.g. {example}.")
    import torch  # here, not at the top: the checks above need no torch

    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MetalearnError(
            f"`{key}` = {str(path)!r} cannot be read as a checkpoint: it is truncated, corrupt or not a "
            f"PyTorch file ({reason[:160]}). Use another checkpoint of the run, e.g. best.ckpt or last.ckpt."
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise MetalearnError(
            f"`{key}` = {str(path)!r} is not a metalearn checkpoint: it holds no run config under "
            f"'{CHECKPOINT_KEY}'. Pass a checkpoint written by `metalearn train`, e.g. {example}."
        )
    return checkpoint


def register_resolvers() -> None:
    """`${metalearn_run_dir:<ckpt>}`: the run folder of a checkpoint (where eval writes eval.json)."""
    OmegaConf.register_new_resolver(
        "metalearn_run_dir",
        lambda ckpt: str(run_dir_of_checkpoint(ckpt)) if ckpt else "outputs/eval",
        replace=True,
    )
