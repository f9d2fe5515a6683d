"""The `metalearn` command: `metalearn train ...`, `metalearn eval ...`, `metalearn episodes ...`.

A thin dispatcher: it removes the subcommand from sys.argv and hands the rest to the Hydra app
of that subcommand, so every Hydra flag (overrides, -m, --cfg, --help, --info, hydra.run.dir=)
works unchanged.
"""

from __future__ import annotations

import sys

USAGE = """usage: metalearn <command> [hydra overrides and flags]

commands:
  train     meta-train a few-shot learner (default: MAML on sinusoid regression)
  eval      score a checkpoint: metalearn eval ckpt=<run>/checkpoints/last.ckpt
            (data=... on another data set; eval.episodes=FILE on the episodes of a file)
  episodes  episode files: export a run's test tasks, make Omniglot within-alphabet episodes (metalearn episodes --help)
  bench     time our meta-iteration against the textbook per-task loop (metalearn bench --help)
  report    tables and plots of a sweep: metalearn report multirun/<date>/<time>
  compress  prune (and meta-fine-tune) or quantize a checkpoint: metalearn compress ckpt=... compress.prune=0.75
  export    adapt a checkpoint to a support set and write it as ONNX or TorchScript: metalearn export ckpt=... support=DIR

Each command takes Hydra overrides (algo=reptile seed=3), -m for sweeps, --cfg job, --help, --info.
"""

#: Hydra plugins that configs may name, with the module that provides them and the package to install
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    "hydra/launcher=rq": ("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    "hydra/sweeper=ax": ("hydra_plugins.hydra_ax_sweeper", "hydra-ax-sweeper"),
    "hydra/sweeper=nevergrad": ("hydra_plugins.hydra_nevergrad_sweeper", "hydra-nevergrad-sweeper"),
}


def missing_plugin(args: list[str], importable=None) -> str | None:
    """The error for a Hydra plugin named on the command line but not installed, else None."""
    import importlib.util

    def default_importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    importable = importable or default_importable
    for arg in args:
        choice = arg.lstrip("+~").replace(" ", "")
        if choice in PLUGINS:
            module, package = PLUGINS[choice]
            if not importable(module):
                return (
                    f"`{choice}` needs the Hydra plugin package {package}, which is not installed. "
                    f"Install it with `pip install {package}` (or `pip install 'metalearn[cluster]'` for the "
                    "joblib, submitit and Optuna plugins), then run the command again."
                )
    return None


def misused_tuning(args: list[str]) -> str | None:
    """The error for `+tuning=NAME` or `tuning=null`, which Hydra answers with a message about its
    defaults-list syntax or a traceback, else None."""
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            continue
        if key in ("+tuning", "++tuning"):
            return (
                f"`{arg}`: `tuning` is already in the config (picked from algo and data as `<algo>_<data>` when "
                f"configs/tuning/ has such a file), so it cannot be added with `+`. Choose one with `tuning={value}`, "
                "or run without one with `~tuning`."
            )
        if key == "tuning" and value.strip().lower() in ("null", "none", ""):
            return f"`{arg}`: to run without the published settings of `tuning`, write `~tuning`; to choose others, `tuning=NAME`."
    return None


COMMANDS = {
    "train": "metalearn_cli.train",
    "eval": "metalearn_cli.evaluate",
    "episodes": "metalearn_cli.episode_commands",
    "bench": "metalearn_cli.bench",
    "report": "metalearn_cli.report",
    "compress": "metalearn_cli.compress",
    "export": "metalearn_cli.export_model",
}


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = args[0]
    if command not in COMMANDS:
        print(
            f"Error: unknown command {command!r}. Allowed: {', '.join(COMMANDS)}. "
            "Run `metalearn --help` for usage.",
            file=sys.stderr,
        )
        sys.exit(2)
    import importlib
    import importlib.util

    from metalearn_cli.allocator import keep_freed_memory

    keep_freed_memory()
    problem = missing_plugin(args[1:]) or misused_tuning(args[1:])
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        sys.exit(2)
    if command in ("bench", "report"):  # plain argparse tools, not Hydra apps
        importlib.import_module(COMMANDS[command]).main(args[1:])
        return
    app = importlib.import_module(COMMANDS[command])
    sys.argv = [sys.argv[0], *args[1:]]
    # Lightning's DDP launcher starts the other ranks as `python -m <__main__.__spec__.name> <argv>`:
    # point it at the subcommand's module so they run `metalearn_cli.train`, not the bare dispatcher.
    import __main__

    __main__.__spec__ = importlib.util.find_spec(COMMANDS[command])
    app.main()


if __name__ == "__main__":
    main()
