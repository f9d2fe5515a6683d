"""`metalearn_cli.allocator`: the malloc settings apply in metalearn's processes unless the user set malloc up."""

import subprocess
import sys

import pytest

CODE = "from metalearn_cli.allocator import keep_freed_memory; print(keep_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("env, applied", [({}, "True"), ({"METALEARN_MALLOC": "default"}, "False"),
                                          ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "False")])
def test_settings_apply_unless_the_user_chose(env, applied):
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "METALEARN_MALLOC", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == applied
