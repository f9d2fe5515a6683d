"""`metalearn episodes <command>`: episode files, fixed lists of few-shot episodes (the format is in
`metalearn_cli.episodes`; `metalearn eval ckpt=... eval.episodes=FILE` scores a checkpoint on one)."""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: metalearn episodes <command> [key=value ...]

commands:
  export                    a run's fixed test tasks as an episode file with PNG images:
                            metalearn episodes export ckpt=<run>/checkpoints/last.ckpt out=tasks.jsonl
  omniglot-within-alphabet  Lake et al.'s one-shot protocol: N-way episodes whose characters all come from one
                            of Omniglot's 20 evaluation alphabets, images extracted as PNG files:
                            metalearn episodes omniglot-within-alphabet root=~/data out=lake.jsonl ways=20 shots=1 num=400

Score a checkpoint on a file: metalearn eval ckpt=... eval.episodes=tasks.jsonl
"""

COMMANDS = {
    "export": "metalearn_cli.export_episodes",
    "omniglot-within-alphabet": "metalearn_cli.omniglot_episodes",
}


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] not in COMMANDS:
        print(f"Error: unknown command `metalearn episodes {args[0]}`. Allowed: {', '.join(COMMANDS)}. "
              "Run `metalearn episodes --help` for usage.", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[args[0]])
    sys.argv = [sys.argv[0], *args[1:]]
    module.main()


if __name__ == "__main__":
    main()
