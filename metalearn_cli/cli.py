"""The `metalearn` command: `metalearn train ...` and `metalearn eval ...`.

A thin dispatcher: it removes the subcommand from sys.argv and hands the rest to the Hydra app
of that subcommand, so every Hydra flag (overrides, -m, --cfg, --help, --info, hydra.run.dir=)
works unchanged.
"""

from __future__ import annotations

import sys

USAGE = """usage: metalearn <command> [hydra overrides and flags]

commands:
  train   meta-train a few-shot learner (default: MAML on sinusoid regression)
  eval    score a checkpoint: metalearn eval ckpt=<run>/checkpoints/last.ckpt
  bench   time our meta-iteration against the textbook per-task loop (metalearn bench --help)
  report  tables and plots of a sweep: metalearn report multirun/<date>/<time>

Each command takes Hydra overrides (algo=reptile seed=3), -m for sweeps, --cfg job, --help, --info.
"""

COMMANDS = {
    "train": "metalearn_cli.train",
    "eval": "metalearn_cli.evaluate",
    "bench": "metalearn_cli.bench",
    "report": "metalearn_cli.report",
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
