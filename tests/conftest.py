import os
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def run_cli(tmp_path):
    """Run the installed `metalearn` command in a subprocess, from a temporary working directory."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("HYDRA_FULL_ERROR", None)
        env["PYTHONWARNINGS"] = "ignore"
        proc = subprocess.run(
            [metalearn_executable(), *args],
            cwd=cwd or tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"metalearn {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


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
