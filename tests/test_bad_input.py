"""Every bad input gets a clear message naming the key and value, a non-zero exit, no traceback,
and nothing already written is lost.

The checks run the `metalearn` command in the test process (conftest.metalearn_in_process: the console
script's entry point with Hydra's parsing, callbacks and error reporting, without starting an
interpreter per command); `test_errors_exit_cleanly_from_the_installed_command` proves with real
processes that each way of failing becomes an exit status and a message without a traceback."""

import pytest
import torch

from conftest import FAST, OMNIGLOT, assert_clean_error, snapshot


@pytest.mark.parametrize(
    "override, needles",
    [
        ("algo=foo", ["algo/foo", "maml", "reptile"]),
        ("data=imagenet1k", ["data/imagenet1k", "sinusoid"]),
        ("sampler.shots=0", ["sampler.shots", "0", "integer >= 1"]),
        ("sampler.shots=-3", ["sampler.shots", "-3"]),
        ("sampler.shots=abc", ["sampler.shots", "'abc'"]),
        ("sampler.queries=0", ["sampler.queries"]),
        ("sampler.meta_batch_size=0", ["sampler.meta_batch_size"]),
        ("algo.inner_steps=0", ["algo.inner_steps", "0"]),
        ("algo.eval_inner_steps=-1", ["algo.eval_inner_steps", "-1"]),
        ("trainer.max_steps=-1", ["trainer.max_steps", "-1", "integer >= 0"]),
        ("algo.inner_lr=0", ["algo.inner_lr", "number > 0"]),
        ("algo.inner_lr=-0.1", ["algo.inner_lr", "-0.1"]),
        ("algo.outer_lr=-1", ["algo.outer_lr", "-1"]),
        ("algo.outer_lr_schedule=step", ["algo.outer_lr_schedule", "'step'", "constant, cosine"]),
        ("algo.outer_lr_final=-0.001", ["algo.outer_lr_final", "-0.001", ">= 0"]),
        ("algo.first_order_steps=-1", ["algo.first_order_steps", "-1", "integer >= 0"]),
        ("algo.vectorize=gpu", ["algo.vectorize", "vmap", "loop"]),
        ("algo.inner_params=bn", ["algo.inner_params", "'bn'", "all, no_bn, head"]),
        ("algo.task_chunk=0", ["algo.task_chunk", "0", "auto"]),
        ("algo.task_threads=0", ["algo.task_threads", "0", "auto"]),
        ("sampler.queries=null", ["sampler.queries", "missing"]),
        ("algo.no_such_key=1", ["algo.no_such_key"]),
        ("iterations_per_batch=2", ["iterations_per_batch", "2", "trainer.val_check_interval", "3"]),
        ("iterations_per_batch=0", ["iterations_per_batch", "0", "auto"]),
    ],
)
def test_bad_training_input(metalearn, tmp_path, override, needles):
    proc = metalearn("train", *FAST, override)
    assert_clean_error(proc, *needles)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["algo.inner_state=keep"], ["algo.inner_state", "'keep'", "reset, carry"]),
        (["algo.inner_state=carry"], ["algo.inner_state=carry", "algo.inner_optimizer", "'sgd'", "algo.inner_optimizer=adam"]),
    ],
)
def test_bad_reptile_inner_state(metalearn, tmp_path, overrides, needles):
    assert_clean_error(metalearn("train", *FAST, "algo=reptile", *overrides), *needles)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "override, needles",
    [
        ("tuning=maml_omniglott", ["`tuning`", "'maml_omniglott'", "maml_omniglot", "reptile_omniglot", "~tuning"]),
        ("+tuning=maml_omniglot", ["+tuning=maml_omniglot", "tuning=maml_omniglot", "~tuning"]),
        ("tuning=null", ["tuning=null", "~tuning"]),
    ],
)
def test_bad_tuning_choice(metalearn, tmp_path, override, needles):
    """A mistyped tuning name must not silently run without the published settings."""
    assert_clean_error(metalearn("train", *FAST, override), *needles)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unknown_command(run_cli):
    assert_clean_error(run_cli("fit"), "unknown command", "train", "eval", status=2)


def test_errors_exit_cleanly_from_the_installed_command(run_cli, tmp_path):
    """The installed command, in real processes: each way a command can fail on bad input (the
    dispatcher above, a MetalearnError of train and of eval through `exits_cleanly`, the run folder's
    Hydra callback, Hydra's own composition error) ends with its exit status and a message, no
    traceback. (test_sweeps' refused -m sweep is one raised after Lightning has built a Trainer.)"""
    assert_clean_error(run_cli("train", *FAST, "sampler.shots=0"), "sampler.shots", "integer >= 1", status=2)
    assert_clean_error(run_cli("eval"), "ckpt", "missing", status=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_clean_error(run_cli("train", *FAST, f"hydra.run.dir={blocker}/run"), "hydra.run.dir", "cannot be written", status=2)
    assert_clean_error(run_cli("train", *FAST, "algo=foo"), "algo/foo", "maml", status=1)  # Hydra reports it, exit 1
    assert not list(tmp_path.rglob("*.ckpt")) and blocker.read_text() == "not a folder"


def test_bad_checkpoints(metalearn, tmp_path, trained_run):
    before = snapshot(trained_run.folder)
    assert_clean_error(metalearn("eval"), "ckpt", "missing")
    assert_clean_error(metalearn("eval", f"ckpt={tmp_path}/nope.ckpt"), "ckpt", "nope.ckpt", "does not exist")
    assert_clean_error(metalearn("eval", f"ckpt={tmp_path}"), "ckpt", "folder")

    not_ours = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, not_ours)
    assert_clean_error(metalearn("eval", f"ckpt={not_ours}"), "other.ckpt", "not a metalearn checkpoint")

    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    assert_clean_error(metalearn("eval", f"ckpt={text}"), "notes.ckpt", "cannot be read")

    truncated = tmp_path / "truncated.ckpt"
    data = (trained_run.folder / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert_clean_error(metalearn("eval", f"ckpt={truncated}"), "truncated.ckpt", "truncated")
    assert_clean_error(metalearn("train", *FAST, f"ckpt_path={truncated}"), "ckpt_path", "truncated")
    assert snapshot(trained_run.folder) == before


def test_eval_overrides_that_conflict_with_the_checkpoint(metalearn, trained_run):
    before = snapshot(trained_run.folder)
    ckpt = f"ckpt={trained_run.folder}/checkpoints/last.ckpt"
    assert_clean_error(metalearn("eval", ckpt, "model.hidden=[80,80]"), "model.hidden", "[40, 40]", "[80, 80]")
    assert_clean_error(metalearn("eval", ckpt, "algo=reptile"), "algo=maml", "algo=reptile")
    assert_clean_error(metalearn("eval", ckpt, "eval.num_tasks=0"), "eval.num_tasks")
    assert snapshot(trained_run.folder) == before


def test_resume_under_another_algorithm_is_refused(metalearn, tmp_path, trained_run):
    """A resume continues the same run: another algo (or data, or model) would silently train another
    experiment from these weights, or fail inside Lightning."""
    before = snapshot(trained_run.folder)
    proc = metalearn("train", *FAST, "algo=reptile", f"ckpt_path={trained_run.folder}/checkpoints/last.ckpt",
                     "hydra.run.dir=resumed")
    assert_clean_error(proc, "ckpt_path", "algo=maml", "algo=reptile", "overrides.yaml")
    assert not (tmp_path / "resumed" / "checkpoints").exists()
    assert snapshot(trained_run.folder) == before


def test_output_folder_that_cannot_be_written(metalearn, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = metalearn("train", *FAST, f"hydra.run.dir={blocker}/run")
    assert_clean_error(proc, "hydra.run.dir", "cannot be written")
    assert blocker.read_text() == "not a folder"
    proc = metalearn("train", "-m", *FAST, f"hydra.sweep.dir={blocker}/sweep")
    assert_clean_error(proc, "hydra.sweep.dir", "cannot be written")
    assert blocker.read_text() == "not a folder"


def test_an_existing_run_is_never_overwritten(metalearn, trained_run):
    before = snapshot(trained_run.folder)
    proc = metalearn("train", *FAST, f"hydra.run.dir={trained_run.folder}")
    assert_clean_error(proc, "hydra.run.dir", "already holds a run")
    assert snapshot(trained_run.folder) == before


@pytest.mark.parametrize(
    "override, needles",
    [
        ("sampler.queries=null", ["sampler.queries", "missing", "classification"]),
        ("sampler.ways=null", ["sampler.ways", "missing"]),
        ("sampler.ways=5000", ["sampler.ways", "5000", "classes"]),
        ("sampler.shots=30", ["sampler.shots", "images per class"]),
        ("data.split=lake", ["data.split", "vinyals", "maml"]),
        ("data.train_on=all", ["data.train_on", "'all'", "train, trainval"]),
        ("model.init=xavier", ["model.init", "'xavier'", "pytorch, reference"]),
        ("data.root=/no/such/folder", ["data.root", "/no/such/folder", "omniglot-py"]),
    ],
)
def test_bad_classification_input(metalearn, tmp_path, override, needles, omniglot_cache):
    proc = metalearn("train", *FAST, "data=omniglot", f"data.root={OMNIGLOT}", f"data.cache_dir={omniglot_cache}", override)
    assert_clean_error(proc, *needles)
    assert not list(tmp_path.rglob("*.ckpt"))
