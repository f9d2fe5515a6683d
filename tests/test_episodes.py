"""Scoring a checkpoint on an episode file (`eval.episodes`), exporting a run's test tasks as one, Omniglot's
within-alphabet episodes, and scoring on another data set (cross-domain)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import OMNIGLOT, assert_clean_error, metalearn_in_process, snapshot, write_grey_classes
from metalearn_cli.data.images import ImageClasses
from metalearn_cli.episodes import load_episode_tasks, read_episode_file
from metalearn_cli.errors import MetalearnError


def scores(run: Path) -> list[dict]:
    with open(run / "eval_tasks.csv") as handle:
        return list(csv.DictReader(handle))


def write_lines(path: Path, episodes: list) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in episodes))
    return path


@pytest.fixture(scope="module")
def proto_run(tmp_path_factory, omniglot_cache) -> Path:
    """A ProtoNets checkpoint meta-trained on Omniglot for two meta-iterations (28x28 grey, inverted strokes)."""
    cwd = tmp_path_factory.mktemp("proto")
    proc = metalearn_in_process(
        "train", "data=omniglot", f"data.root={OMNIGLOT}", f"data.cache_dir={omniglot_cache}", "algo=protonet",
        "sampler.train_ways=5", "sampler.meta_batch_size=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "eval.val_tasks=2", "eval.num_tasks=2", "trainer.enable_progress_bar=false", "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory) -> Path:
    """60 classes of two 16x16 grey PNGs each: 20 per split with data.fractions=[0.34,0.33,0.33]."""
    return write_grey_classes(tmp_path_factory.mktemp("grey"), 60, 2)


@pytest.fixture(scope="module")
def maml20_run(tmp_path_factory, grey_folder) -> Path:
    """A 20-way MAML checkpoint (an output layer of 20 classes) of one meta-iteration on `grey_folder`."""
    cwd = tmp_path_factory.mktemp("maml20")
    proc = metalearn_in_process(
        "train", "data=folder", f"data.root={grey_folder}", "data.image_size=16", "data.channels=1",
        "data.fractions=[0.34,0.33,0.33]", f"data.cache_dir={cwd / 'cache'}", "algo=maml", "model.channels=8",
        "sampler.ways=20", "sampler.queries=1", "sampler.meta_batch_size=1", "trainer.max_steps=1",
        "trainer.val_check_interval=1", "eval.val_tasks=1", "eval.num_tasks=1", "algo.eval_inner_steps=1",
        "trainer.enable_progress_bar=false", "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / "run"


def test_exported_test_tasks_score_as_the_fixed_tasks(metalearn, tmp_path, proto_run, omniglot_cache):
    """Round trip: a run's test tasks exported as an episode file (PNG images) and scored from it give the
    same inputs, bit for bit (rotated classes written turned, strokes not inverted in the files), and so the
    same per-task accuracies as `metalearn eval` on the same tasks."""
    run = shutil.copytree(proto_run, tmp_path / "run")
    ckpt = f"ckpt={run}/checkpoints/last.ckpt"
    shape = ["eval.num_tasks=6", "sampler.queries=3"]
    metalearn("eval", ckpt, *shape, check=True)
    fixed = scores(run)
    out = tmp_path / "exported" / "tasks.jsonl"
    proc = metalearn("episodes", "export", ckpt, *shape, f"out={out}", check=True)
    assert "wrote 6 episodes" in proc.stdout
    assert_clean_error(metalearn("episodes", "export", ckpt, f"out={out}"), "`out`", "already exists", status=2)
    proc = metalearn("eval", ckpt, f"eval.episodes={out}", check=True)
    assert "scored on the 6 episodes" in proc.stdout
    record = json.loads((run / "eval.json").read_text())
    assert (record["data"], record["trained_on"], record["num_tasks"]) == ("episodes", "omniglot", 6)
    assert record["episodes"]["file"] == str(out) and len(record["episodes"]["sha256"]) == 64
    assert (record["ways"], record["shots"], record["queries"]) == (5, 1, 3)
    from_file = scores(run)
    assert [r["acc_step0"] for r in from_file] == [r["acc_step0"] for r in fixed]
    assert [int(r["line"]) for r in from_file] == [1, 2, 3, 4, 5, 6]

    # the inputs themselves: the sampler's fixed tasks and the file's, through the checkpoint's preprocessing
    from metalearn_cli.data.omniglot import Omniglot
    from metalearn_cli.samplers import EpisodicSampler

    source = Omniglot(str(OMNIGLOT), cache_dir=str(omniglot_cache))
    tasks = EpisodicSampler(source, shots=1, queries=3, meta_batch_size=1, ways=5).fixed_tasks("test", 6, 0)
    [group] = load_episode_tasks(read_episode_file(out), source.input_shape, source.inputs, 0).groups
    loaded = group.slice(0, 6)
    for a, b in zip(tasks.tensors(), loaded.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(tasks.task_seeds, loaded.task_seeds)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    names = [n for line in lines for n in line["classes"]]
    assert any(n.endswith(("rot090", "rot180", "rot270")) for n in names)  # rotated characters were exported
    first = np.asarray(Image.open(out.parent / lines[0]["support"][0][0]))
    assert first.shape == (28, 28) and first.mean() > 128  # white paper, dark strokes: as Omniglot's files


def test_any_n_for_protonets_and_the_head_size_for_maml(metalearn, tmp_path, proto_run, maml20_run, grey_folder):
    """The done-when of the issue: an Omniglot ProtoNets checkpoint scored on 20-way within-alphabet
    episodes; a 20-way MAML checkpoint takes 20-way episodes and refuses others, naming the line."""
    out = tmp_path / "lake.jsonl"
    metalearn("episodes", "omniglot-within-alphabet", f"root={OMNIGLOT}", f"out={out}", "num=3", "seed=1", check=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for line in lines:  # one alphabet per episode; support and query drawn by different people
        assert len({c.split("/")[0] for c in line["classes"]}) == 1 == len({line["alphabet"]})
        assert len(line["support"]) == len(line["query"]) == 20
        assert not set(line["drawers"]["support"]) & set(line["drawers"]["query"])
    run = shutil.copytree(proto_run, tmp_path / "proto")
    metalearn("eval", f"ckpt={run}/checkpoints/last.ckpt", f"eval.episodes={out}", check=True)
    record = json.loads((run / "eval.json").read_text())
    assert (record["ways"], record["shots"], record["queries"], record["num_tasks"]) == (20, 1, 1, 3)
    assert 0 <= record["mean"] <= 1

    twenty = [{"support": [[f"{grey_folder}/c{c:02d}/0.png", c - start] for c in range(start, start + 20)],
               "query": [[f"{grey_folder}/c{c:02d}/1.png", c - start] for c in range(start, start + 20)]} for start in (0, 20)]
    five = {"support": [[f"{grey_folder}/c{c:02d}/0.png", c] for c in range(5)], "query": [[f"{grey_folder}/c{c:02d}/1.png", 4 - c] for c in range(5)]}
    mixed = write_lines(tmp_path / "mixed.jsonl", [*twenty, five])
    maml = shutil.copytree(maml20_run, tmp_path / "maml")
    metalearn("eval", f"ckpt={maml}/checkpoints/last.ckpt", f"eval.episodes={write_lines(tmp_path / 'twenty.jsonl', twenty)}", check=True)
    assert len(scores(maml)) == 2 and json.loads((maml / "eval.json").read_text())["ways"] == 20
    assert_clean_error(metalearn("eval", f"ckpt={maml}/checkpoints/last.ckpt", f"eval.episodes={mixed}"),
                       "mixed.jsonl", "line 3", "N = 5", "output layer of 20 classes", status=2)
    assert_clean_error(metalearn("eval", f"ckpt={maml}/checkpoints/last.ckpt", "sampler.ways=5"),
                       "`sampler.ways` = 5", "20 classes", status=2)
    # ProtoNets batch the 20-way and the 5-way episodes apart and report all three in file order
    metalearn("eval", f"ckpt={run}/checkpoints/last.ckpt", f"eval.episodes={mixed}", check=True)
    record = json.loads((run / "eval.json").read_text())
    assert record["ways"] is None and record["episode_shapes"] == {"20-way, 20 support, 20 query": 2, "5-way, 5 support, 5 query": 1}
    assert [(r["line"], r["ways"]) for r in scores(run)] == [("1", "20"), ("2", "20"), ("3", "5")]
    # so does Baseline (algo=finetune, trained 20-way): a new head per episode, of its own number of classes
    metalearn("train", "data=folder", f"data.root={grey_folder}", "data.image_size=16", "data.channels=1",
              "data.fractions=[0.34,0.33,0.33]", f"data.cache_dir={tmp_path / 'cache'}", "algo=finetune", "model.channels=8",
              "sampler.ways=20", "sampler.queries=1", "sampler.meta_batch_size=1", "trainer.max_steps=1",
              "trainer.val_check_interval=1", "eval.val_tasks=1", "eval.num_tasks=1", "algo.eval_inner_steps=1",
              "trainer.enable_progress_bar=false", "hydra.run.dir=finetune", check=True)
    metalearn("eval", f"ckpt={tmp_path}/finetune/checkpoints/last.ckpt", f"eval.episodes={mixed}", check=True)
    assert [r["ways"] for r in scores(tmp_path / "finetune")] == ["20", "20", "5"]


def test_cross_domain_omniglot_checkpoint_on_an_rgb_folder(metalearn, tmp_path, proto_run):
    root = tmp_path / "scans"
    rng = np.random.default_rng(1)
    for c in range(10):
        (root / f"kind{c}").mkdir(parents=True)
        base = rng.integers(0, 256, (30, 40, 3))
        for i in range(4):
            Image.fromarray(np.clip(base + rng.integers(-30, 30, (30, 40, 3)), 0, 255).astype(np.uint8)).save(root / f"kind{c}" / f"{i}.jpg")
    run = shutil.copytree(proto_run, tmp_path / "run")
    ckpt = f"ckpt={run}/checkpoints/last.ckpt"
    data = ["data=folder", f"data.root={root}", "data.fractions=[0.2,0.2,0.6]", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = metalearn("eval", ckpt, *data, "eval.num_tasks=4", "sampler.queries=2", check=True)
    assert "scored on the test classes of data=folder" in proc.stdout and "1x28x28" in proc.stdout
    record = json.loads((run / "eval.json").read_text())
    assert (record["data"], record["trained_on"], record["num_tasks"], record["queries"]) == ("folder", "omniglot", 4, 2)
    assert (record["data_config"]["image_size"], record["data_config"]["channels"], record["data_config"]["root"]) == (28, 1, str(root))
    assert all(np.isfinite(step["mean"]) for step in record["per_step"])
    assert_clean_error(metalearn("eval", ckpt, *data, "data.image_size=84"), "data.image_size", "84", "28", status=2)


def test_shapes_that_cannot_fit_are_refused(metalearn, tmp_path, trained_run, proto_run):
    """A regression checkpoint on images (and an image checkpoint on sinusoid) is refused by name, before
    anything is written."""
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    before = snapshot(trained_run.folder)
    ckpt = f"ckpt={trained_run.folder}/checkpoints/last.ckpt"
    assert_clean_error(metalearn("eval", ckpt, "data=folder", f"data.root={tmp_path / 'imgs'}"),
                       "`data=folder` gives classification tasks", "sinusoid", "regression", status=2)
    episodes = write_lines(tmp_path / "e.jsonl", [{"support": [["imgs/a/x.png", 0], ["imgs/a/x.png", 1]], "query": [["imgs/a/x.png", 1]]}])
    assert_clean_error(metalearn("eval", ckpt, f"eval.episodes={episodes}"), "eval.episodes", "sinusoid", status=2)
    assert snapshot(trained_run.folder) == before
    assert_clean_error(metalearn("eval", f"ckpt={proto_run}/checkpoints/last.ckpt", "data=sinusoid"),
                       "`data=sinusoid` gives regression tasks", "omniglot", status=2)


def test_episode_file_problems_name_the_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = {"support": [["a.png", 0], ["a.png", 1]], "query": [["a.png", 1]]}
    cases = [
        ('{"support": [["a.png", 0]', "not valid JSON"),
        ({"support": [["a.png", 0], ["a.png", 2]], "query": [["a.png", 0]]}, "label(s) [1] label no support image"),
        ({"support": [["a.png", 0], ["a.png", 1]], "query": [["a.png", 2]]}, "query label(s) [2]"),
        ({"support": [["a.png", 0], ["a.png", 1]]}, '"query" is missing'),
        ({"support": [["a.png", "0"], ["a.png", 1]], "query": [["a.png", 0]]}, 'entry 1 of "support"'),
        ({"support": [["b.png", 0], ["a.png", 1]], "query": [["a.png", 0]]}, "b.png", ),
    ]
    for i, (bad, needle) in enumerate(cases):
        path = write_lines(tmp_path / f"bad{i}.jsonl", [good, "", bad])
        with pytest.raises(MetalearnError) as error:
            read_episode_file(path)
        assert f"bad{i}.jsonl" in str(error.value) and "line 3" in str(error.value) and needle in str(error.value), str(error.value)
    episodes = read_episode_file(write_lines(tmp_path / "ok.jsonl", [good, {**good, "seed": 7}])).episodes
    assert [e.shape for e in episodes] == [(2, 2, 1), (2, 2, 1)] and episodes[1].seed == 7
    with pytest.raises(MetalearnError, match="cannot be read as an image"):
        load_episode_tasks(read_episode_file(tmp_path / "ok.jsonl"), (1, 8, 8), lambda x: x.float(), 0)


def test_grey_and_rgb_convert_as_pillow_converts_files():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 12, 9, 3), dtype=np.uint8)
    classes = ImageClasses(torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy()), [2, 1], ["a", "b"])
    grey = classes.with_channels(1).pixels.numpy()
    assert np.array_equal(grey[:, 0], np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb]))
    back = classes.with_channels(1).with_channels(3).pixels.numpy().transpose(0, 2, 3, 1)
    assert np.array_equal(back, np.stack([np.asarray(Image.fromarray(g[0]).convert("RGB")) for g in grey]))


def test_a_source_of_other_channels_is_fitted_to_the_checkpoint(tmp_path):
    """Cross-domain: a source whose images have other channels than the checkpoint's model takes is converted
    (Omniglot and MNIST are grey, CIFAR-FS and miniImageNet RGB); one whose size cannot be set is refused."""
    from types import SimpleNamespace

    from metalearn_cli.cross_domain import fit_to_checkpoint
    from metalearn_cli.data.folder import ImageFolder
    from metalearn_cli.tasks import CLASSIFICATION

    for c in range(3):
        (tmp_path / "rgb" / f"k{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 10), (60 * c, 200, 30 * i)).save(tmp_path / "rgb" / f"k{c}" / f"{i}.png")
    source = ImageFolder(str(tmp_path / "rgb"), image_size=12, channels=3, fractions=[0.34, 0.33, 0.33], cache_dir=str(tmp_path / "cache"))
    grey_model = SimpleNamespace(objective=CLASSIFICATION, input_shape=(1, 12, 12))
    assert fit_to_checkpoint(source, grey_model, "folder", "omniglot") == "RGB images converted to grey"
    tasks = source.sample("test", torch.Generator().manual_seed(0), 1, 1, 1, 1)
    assert source.input_shape == (1, 12, 12) and tasks.support_x.shape[-3:] == (1, 12, 12)
    with pytest.raises(MetalearnError, match=r"takes \(1, 28, 28\)"):
        fit_to_checkpoint(source, SimpleNamespace(objective=CLASSIFICATION, input_shape=(1, 28, 28)), "folder", "omniglot")


def test_tasks_of_several_groups_are_scored_once_each_across_ranks():
    """The order `scored_order` gives is the order the ranks' chunks are gathered in, every task once."""
    from metalearn_cli.datamodule import TaskDataModule

    class Group:
        def __init__(self, ids):
            self.ids = ids
            self.num_tasks = len(ids)

        def slice(self, start, stop):
            return self.ids[start:stop]

    module = TaskDataModule(sampler=None, seed=0, task_seed=0, val_tasks=1, test_tasks=1, eval_batch_tasks=3)
    module.set_fixed_tasks("test", [Group(list(range(7))), Group(list(range(7, 12)))])
    for world in (1, 2, 3):
        gathered = []
        for rank in range(world):
            module.trainer = type("T", (), {"global_rank": rank, "world_size": world})()
            gathered += [i for chunk in module.test_dataloader() for i in chunk]
        assert gathered == module.scored_order("test", world) and sorted(gathered) == list(range(12))
