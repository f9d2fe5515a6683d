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

Each command takes Hydra overrides (algo=reptile seed=3), -m for sweeps, --cfg job, --help, --info.
"""

COMMANDS = {
    "train": "metalearn_cli.train",
    "eval": "metalearn_cli.evaluate",
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

    app = importlib.import_module(COMMANDS[command])
    sys.argv = [sys.argv[0], *args[1:]]
    app.main()


if __name__ == "__main__":
    main()
