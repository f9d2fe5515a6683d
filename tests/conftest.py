import io
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]


def _find_omniglot() -> Path:
    """The real Omniglot copy: $METALEARN_OMNIGLOT, else shared/datasets/omniglot beside the checkout
    or beside one of its parent folders (tests that need it are skipped where there is none)."""
    if os.environ.get("METALEARN_OMNIGLOT"):
        return Path(os.environ["METALEARN_OMNIGLOT"])
    for folder in REPO.parents:
        candidate = folder / "shared" / "datasets" / "omniglot"
        if (candidate / "omniglot-py").exists():
            return candidate
    return REPO.parent / "shared" / "datasets" / "omniglot"


OMNIGLOT = _find_omniglot()
#: a short training run: a few meta-iterations, one validation, few test tasks
FAST = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "eval.num_tasks=8",
    "eval.val_tasks=8",
    "checkpoint.every_n_steps=2",
    "trainer.log_every_n_steps=1",
]


def metalearn_executable() -> str:
    found = shutil.which("metalearn") or str(Path(sys.executable).with_name("metalearn"))
    assert Path(found).exists(), "the metalearn console script is not installed (pip install -e .)"
    return found


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def write_grey_classes(root: Path, classes: int, per_class: int, side: int = 16) -> Path:
    """`root`/c00, c01, ...: `classes` folders of `per_class` grey PNGs of side x side pixels, each class a noisy
    copy of its own random pattern (one generator, seed 0, class after class): a labelled folder for data=folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (side, side))
        for i in range(per_class):
            Image.fromarray(np.clip(base + rng.integers(-40, 40, (side, side)), 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def run_folders(root: Path) -> list[Path]:
    """The run folders (those holding .hydra/config.yaml) under `root`."""
    return sorted(p.parent.parent for p in root.rglob(".hydra/config.yaml"))


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: compare two snapshots to prove nothing was altered."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_cli(tmp_path):
    """Run the installed `metalearn` command in a subprocess, from a temporary working directory.
    For the tests where the process itself is the point (console script, signals, DDP, sweeps with -m,
    concurrent processes) and the few that prove the error-to-exit-status mapping end to end."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [metalearn_executable(), *args],
            cwd=cwd or tmp_path,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"metalearn {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


# -- the `metalearn` command in this process ----------------------------------------------------
def metalearn_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `metalearn <args>` through the console script's own entry point (metalearn_cli.cli.main)
    inside the test process, from `cwd`: Hydra's command-line parsing and composition, its callbacks
    (RunFolderGuard), the run folder's .hydra/ and log, `exits_cleanly` and Hydra's error reporting all
    run as in the installed command; only the start of a Python interpreter (importing torch, Lightning
    and Hydra: seconds per command) is saved.

    Each command starts, as a new interpreter would, from global random generators seeded from the
    operating system (Python's, numpy's, torch's): whatever a run does not seed itself differs from one
    command to the next, as between two processes, so that a test comparing two runs (resume, DDP)
    still catches it.

    Returns what the process would have given: the exit status (SystemExit's code, 0 on return, 1 and a
    traceback on stderr for an exception that escapes, as Python would print it) and what was written to
    stdout and stderr. Everything the command changes in the process is put back afterwards: working
    directory, sys.argv, environment variables (Lightning's PL_GLOBAL_SEED), the random generators
    (seeded by the run), warning filters, signal handlers, logging handlers (Hydra's job logging),
    Hydra's global state and `__main__.__spec__` (which the dispatcher sets)."""
    import __main__

    import hydra._internal.utils as hydra_internal

    from metalearn_cli import cli

    saved_argv, saved_cwd, saved_env = sys.argv[:], os.getcwd(), dict(os.environ)
    saved_spec = getattr(__main__, "__spec__", None)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_debugger_check = hydra_internal.is_under_debugger
    saved_rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_warning_filters = warnings.filters[:]
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    # Lightning's loggers print through handlers of their own, made at import with the stderr of then
    streams = {}
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                streams[handler] = handler.setStream(err)
    code: int = 0
    try:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        # Hydra re-raises instead of reporting when it thinks a debugger runs (sys.gettrace(): coverage)
        hydra_internal.is_under_debugger = lambda: False
        os.chdir(cwd)
        random.seed()  # from os.urandom, as at interpreter start
        np.random.seed()
        torch.seed()
        sys.argv = [metalearn_executable(), *args]
        GlobalHydra.instance().clear()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:  # sys.exit("message"): Python prints it and exits 1
                    print(stop.code, file=sys.stderr)
                    code = 1
            except Exception:  # what the interpreter would print for an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        hydra_internal.is_under_debugger = saved_debugger_check
        random.setstate(saved_rngs[0])
        np.random.set_state(saved_rngs[1])
        torch.set_rng_state(saved_rngs[2])
        warnings.filters[:] = saved_warning_filters
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()  # Hydra's train.log in the run folder
        root.handlers[:] = saved_handlers
        for handler, stream in streams.items():
            handler.setStream(stream)
        root.setLevel(saved_level)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        __main__.__spec__ = saved_spec
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["metalearn", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def metalearn(tmp_path):
    """`metalearn(*args, cwd=..., check=...)`: the `metalearn` command run in this process (see
    metalearn_in_process), from tmp_path unless told otherwise; the same interface as run_cli."""

    def run(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
        proc = metalearn_in_process(*args, cwd=cwd or tmp_path)
        if check and proc.returncode != 0:
            raise AssertionError(f"metalearn {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def assert_clean_error(proc, *needles: str, status: int | None = None) -> str:
    """A failed command: non-zero exit (or exactly `status`), no traceback, and every needle in its output."""
    err = proc.stderr + proc.stdout
    assert proc.returncode != 0, err
    if status is not None:
        assert proc.returncode == status, (proc.returncode, err)
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


# -- one short training run for every test that needs a checkpoint -------------------------------
@dataclass
class TrainedRun:
    """A finished `metalearn train *FAST` run (in outputs/<date>/<time>/), made once per session."""

    folder: Path  # outputs/<date>/<time>
    cwd: Path  # where the command ran
    stdout: str
    stderr: str

    def copy_to(self, destination: Path) -> Path:
        """A copy of the run folder, for a test that writes into it (eval.json, evals.jsonl)."""
        shutil.copytree(self.folder, destination)
        return destination


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One short training run shared by every test that needs a checkpoint. Its files must never be
    altered: a test that evaluates it (eval writes into the run folder) works on `copy_to(tmp_path/...)`,
    and the tests that pass it to commands that must not write compare `snapshot`s before and after."""
    cwd = tmp_path_factory.mktemp("trained")
    proc = metalearn_in_process("train", *FAST, cwd=cwd)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    [folder] = run_folders(cwd / "outputs")
    return TrainedRun(folder, cwd, proc.stdout, proc.stderr)


@pytest.fixture
def compose_cfg():
    """Compose the real configs in-process, as the CLI would (with ${hydra:...} resolvable)."""

    def _compose(*overrides: str, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_module(version_base="1.3", config_module="metalearn_cli.configs"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real run: the task config has no hydra node
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory):
    """One decoded-image cache for the whole session (decoding all of Omniglot takes ~10 s)."""
    if not (OMNIGLOT / "omniglot-py").exists():
        pytest.skip("no Omniglot copy at ../shared")
    folder = tmp_path_factory.mktemp("omniglot-cache")
    from metalearn_cli.data.omniglot import Omniglot

    Omniglot(str(OMNIGLOT), cache_dir=str(folder))
    return folder
