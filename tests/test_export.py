"""`metalearn export`: one task's adapted network as a plain network (`Algorithm.adapted_network`) that gives
evaluation's logits, written as ONNX or TorchScript, checked against PyTorch, with its JSON record; and the
command's refusals of bad input (exit 2, one paragraph, nothing written)."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, metalearn_in_process, snapshot, write_grey_classes
from metalearn_cli.algorithms import ANIL, MAML, Finetune, FunctionalModel, MAMLpp, MetaSGD, ProtoNet, Reptile
from metalearn_cli.compression.formats import ExportFormat
from metalearn_cli.models import Conv4
from metalearn_cli.tasks import CLASSIFICATION, TaskBatch

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")  # loading the files as a user would
WAYS, SHOTS, QUERIES, SIDE = 3, 2, 3, 16
STEPS = dict(inner_lr=0.3, inner_steps=2, eval_inner_steps=3, outer_lr=1e-3)


# -- the adapted network is evaluation's predictor --------------------------------------------------
def _task(queries_are_support: bool) -> TaskBatch:
    """One 3-way 2-shot task of random 16x16 grey images (the queries: other images, or the support set itself)."""
    generator = torch.Generator().manual_seed(0)
    support_x = torch.rand(1, WAYS * SHOTS, 1, SIDE, SIDE, generator=generator)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS)[None]
    if queries_are_support:
        query_x, query_y = support_x.clone(), support_y.clone()
    else:
        query_x = torch.rand(1, WAYS * QUERIES, 1, SIDE, SIDE, generator=generator)
        query_y = torch.arange(WAYS).repeat_interleave(QUERIES)[None]
    return TaskBatch(support_x, support_y, query_x, query_y, seed=3, task_seeds=torch.tensor([11]), objective=CLASSIFICATION)


def _model(bn: str) -> Conv4:
    torch.manual_seed(0)
    model = Conv4((1, SIDE, SIDE), WAYS, channels=4, bn=bn, bn_steps=2)
    with torch.no_grad():  # stored statistics unlike any batch's, so that using the wrong ones shows
        for layer in model.modules():
            if hasattr(layer, "running_mean"):
                layer.running_mean.uniform_(-0.3, 0.3)
                layer.running_var.uniform_(0.5, 2.0)
    return model.eval()  # as at test


def _algorithm(name: str, model: Conv4):
    if name == "maml":
        return MAML(**STEPS)
    if name == "anil":
        return ANIL(**STEPS)
    if name == "metasgd":
        algorithm = MetaSGD(**STEPS)
    elif name == "mamlpp":
        algorithm = MAMLpp(**STEPS)
    elif name == "reptile":  # Adam from zeros, on mini-batches drawn from the task's seed
        return Reptile(**STEPS, eval_inner_optimizer="adam", eval_inner_batch_size=4)
    elif name == "protonet":
        return ProtoNet(outer_lr=1e-3)
    else:  # finetune-linear, finetune-cosine, finetune-backbone
        head = "cosine" if name.endswith("cosine") else "linear"
        algorithm = Finetune(**STEPS, head=head, finetune_backbone=name.endswith("backbone"))
        source = SimpleNamespace(objective=CLASSIFICATION, name="tiny")
        algorithm.extra_modules(model, source, SimpleNamespace(train_classes=lambda: 7))
        return algorithm
    algorithm.extra_modules(model, None, None)
    with torch.no_grad():  # learned rates of different sizes per parameter (and step)
        for rate in algorithm.rates.parameters():
            rate.uniform_(0.05, 0.5)
    return algorithm


def _evaluation_logits(algorithm, fmodel: FunctionalModel, task: TaskBatch) -> torch.Tensor:
    """The query logits evaluation scores after its last step: what it hands its objective's metric."""
    seen = []

    def metric(logits, labels):
        seen.append(logits.detach().clone())
        return CLASSIFICATION.task_metric(logits, labels)

    task = dataclasses.replace(task, objective=dataclasses.replace(CLASSIFICATION, task_metric=metric))
    scores = algorithm.evaluation(fmodel, task).scores
    assert len(seen) == scores.shape[1]  # one per step: the last is after the last step
    return seen[-1][0]


#: every algorithm family with stored per-step statistics (ProtoNets: frozen, they have no steps), and the
#: other batch-norm modes on one algorithm of each kind of classifier
CASES = [(name, "per_step") for name in ("maml", "anil", "metasgd", "mamlpp", "reptile", "finetune-linear",
                                         "finetune-cosine", "finetune-backbone")] + \
        [("maml", "frozen"), ("protonet", "frozen"), ("maml", "transductive"), ("protonet", "transductive"),
         ("finetune-linear", "transductive")]


@pytest.mark.parametrize("name, bn", CASES)
def test_the_adapted_network_gives_evaluations_logits(name, bn):
    """For every algorithm family, the plain network made from one task gives, on the task's queries, the logits
    evaluation scores after its last step (to 1e-5). With stored batch-norm statistics (frozen, per_step: those
    of the step adaptation ended at) on any queries; transductively where the queries are the support set, whose
    statistics the exported network keeps (evaluation normalises each query batch with its own)."""
    model = _model(bn)
    algorithm = _algorithm(name, model)
    fmodel = FunctionalModel(model)
    task = _task(queries_are_support=bn == "transductive")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    network = algorithm.adapted_network(fmodel, task)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the checkpoint's model is untouched
    assert not any(isinstance(m, type(model.features[1])) for m in network.modules())  # plain BatchNorm2d only
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    expected = _evaluation_logits(algorithm, fmodel, task)
    with torch.no_grad():
        got = network(task.query_x[0])
    assert got.shape == (task.query_x.shape[1], WAYS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_transductive_statistics_are_the_support_sets():
    """Fixed from the support set: each layer's mean and (biased) variance of what it normalised in a forward pass
    over the support images with the adapted parameters. On other queries the exported network's logits differ
    from transductive evaluation's (which normalises them with their own batch), and an image gets the same
    logits alone as in a batch."""
    model = _model("transductive")
    algorithm, fmodel, task = MAML(**STEPS), FunctionalModel(model), _task(queries_are_support=False)
    network = algorithm.adapted_network(fmodel, task)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4
    seen = []  # what each layer normalises on the support images (the same as transductively: same statistics)
    hooks = [norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0])) for norm in norms]
    with torch.no_grad():
        network(task.support_x[0])
    for hook in hooks:
        hook.remove()
    for norm, x in zip(norms, seen):
        torch.testing.assert_close(norm.running_mean, x.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(norm.running_var, x.var(dim=(0, 2, 3), unbiased=False))
    expected = _evaluation_logits(algorithm, fmodel, task)
    with torch.no_grad():
        got = network(task.query_x[0])
        alone = torch.cat([network(task.query_x[0][i : i + 1]) for i in range(got.shape[0])])
    assert not torch.allclose(got, expected, atol=1e-3)
    torch.testing.assert_close(alone, got, rtol=1e-5, atol=1e-5)  # each image on its own: batches do not matter


@pytest.mark.parametrize("name", ["maml", "protonet", "finetune-linear", "reptile"])
def test_query_statistics_give_transductive_evaluations_logits(name):
    """Fixed from the query batch (`bn_batch="query"`, what int8 scoring quantizes): on queries other than the
    support set, the network gives the logits transductive evaluation scores, which normalises them with their
    own batch."""
    model = _model("transductive")
    algorithm, fmodel, task = _algorithm(name, model), FunctionalModel(model), _task(queries_are_support=False)
    network = algorithm.adapted_network(fmodel, task, bn_batch="query")
    with torch.no_grad():
        got = network(task.query_x[0])
    torch.testing.assert_close(got, _evaluation_logits(algorithm, fmodel, task), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="allowed: support, query"):
        algorithm.adapted_network(fmodel, task, bn_batch="both")


# -- the command ---------------------------------------------------------------------------------------
def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """15 classes of four 16x16 grey PNGs, each class a noisy copy of its own pattern (5 classes per split with
    data.fractions=[0.34,0.33,0.33])."""
    return write_grey_classes(tmp_path_factory.mktemp("images"), 15, 4, side=SIDE)


def _train(cwd: Path, images: Path, *args: str) -> Path:
    proc = metalearn_in_process(
        "train", "data=folder", f"data.root={images}", f"data.image_size={SIDE}", "data.channels=1",
        "data.fractions=[0.34,0.33,0.33]", f"data.cache_dir={cwd / 'cache'}", "model.channels=8", f"sampler.ways={WAYS}",
        "sampler.shots=1", "sampler.queries=2", "sampler.meta_batch_size=1", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "eval.val_tasks=1", "eval.num_tasks=2", "trainer.enable_progress_bar=false",
        "hydra.run.dir=run", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory, images) -> Path:
    """A 3-way MAML checkpoint with per-step batch-norm statistics (two meta-iterations)."""
    return _train(tmp_path_factory.mktemp("maml"), images, "algo=maml", "model.bn=per_step", "algo.eval_inner_steps=2")


@pytest.fixture(scope="module")
def proto_run(tmp_path_factory, images) -> Path:
    """A ProtoNets checkpoint with transductive batch norm (two meta-iterations)."""
    return _train(tmp_path_factory.mktemp("proto"), images, "algo=protonet")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A support folder of 3 classes whose names do not sort in the order they were made (zebra, apple, mango),
    two images each, and a query folder of the same classes; images of new patterns, unseen in training."""
    root = tmp_path_factory.mktemp("mine")
    rng = np.random.default_rng(1)
    for name in ("zebra", "apple", "mango"):
        base = rng.integers(0, 256, (SIDE, SIDE))
        for part, count in (("support", 2), ("query", 3)):
            for i in range(count):
                _png(root / part / name / f"{part}{i}.png", np.clip(base + rng.integers(-30, 30, (SIDE, SIDE)), 0, 255))
    return {"support": root / "support", "query": root / "query"}


def _inputs(folder: Path, record: dict) -> tuple[torch.Tensor, list[str]]:
    """The images of a labeled folder as the record's preprocessing says to make them, and each one's class."""
    assert record["preprocessing"]["channels"] == 1 and not record["preprocessing"]["invert"]
    height, width = record["preprocessing"]["size"]
    xs, names = [], []
    for path in sorted(folder.glob("*/*.png")):
        image = Image.open(path).convert("L").resize((width, height), Image.LANCZOS)
        xs.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None])
        names.append(path.parent.name)
    return torch.stack(xs), names


def test_onnx_and_torchscript_round_trips(metalearn, maml_run, folders, tmp_path):
    """A MAML checkpoint adapted to a support folder, written as ONNX and as TorchScript: each file checked by its
    runtime within 1e-4 of PyTorch, the JSON record beside it (classes in sorted folder order, the preprocessing),
    and the two files, run here by onnxruntime and torch.jit.load on images made as the record says, agree. With
    per-step batch-norm statistics, the exported network's query accuracy is evaluation's."""
    import onnxruntime

    ckpt = f"ckpt={maml_run}/checkpoints/last.ckpt"
    proc = metalearn("export", ckpt, f"support={folders['support']}", f"query={folders['query']}", "format=onnx", check=True)
    assert "checked: onnxruntime" in proc.stdout and "on 9 query images" in proc.stdout and "<= 1e-4" in proc.stdout
    onnx_file = maml_run / "export" / "support.onnx"
    record = json.loads((onnx_file.parent / "support.onnx.json").read_text())
    assert record["classes"] == ["apple", "mango", "zebra"]
    assert record["input"]["shape"] == ["batch", 1, SIDE, SIDE] and record["output"]["shape"] == ["batch", WAYS]
    assert record["check"]["passed"] and record["check"]["images"] == 9 and record["check"]["max_abs_diff"] <= 1e-4
    assert record["adaptation"]["shots_per_class"] == {"apple": 2, "mango": 2, "zebra": 2}
    assert record["batch_norm"]["model.bn"] == "per_step" and record["adaptation"]["eval_inner_steps"] == 2
    assert record["accuracy"]["queries"] == 9 and record["accuracy"]["exported"] == pytest.approx(record["accuracy"]["eval"])

    out = tmp_path / "deploy" / "model.pt"
    proc = metalearn("export", ckpt, f"support={folders['support']}", f"query={folders['query']}", "format=torchscript",
                     f"out={out}", check=True)
    assert "checked: torch.jit.load vs PyTorch on 9 query images" in proc.stdout
    assert json.loads((tmp_path / "deploy" / "model.pt.json").read_text())["classes"] == record["classes"]

    x, names = _inputs(folders["query"], record)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    from_onnx = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    from_torchscript = torch.jit.load(str(out))(x)
    torch.testing.assert_close(from_onnx, from_torchscript, rtol=0, atol=1e-4)
    one = torch.from_numpy(session.run(["logits"], {"images": x[:1].numpy()})[0])  # any batch size, one image too
    torch.testing.assert_close(one, from_onnx[:1], rtol=0, atol=1e-5)
    hits = sum(record["classes"][i] == name for i, name in zip(from_onnx.argmax(1).tolist(), names))
    assert hits / len(names) == pytest.approx(record["accuracy"]["exported"])

    proc = metalearn("export", ckpt, "task=1", "format=torchscript", check=True)
    task = json.loads((maml_run / "export" / "test-task-1.pt.json").read_text())
    assert task["adaptation"]["task"] == 1 and task["check"]["on"] == "query images" and task["check"]["images"] == 2 * WAYS
    assert len(task["classes"]) == WAYS and all(c.startswith("c") for c in task["classes"])
    assert task["accuracy"]["exported"] == pytest.approx(task["accuracy"]["eval"])


def test_class_order_is_the_folders(metalearn, proto_run, folders, tmp_path):
    """ProtoNets adapted to one image per class, checked on the support images: with batch norm fixed from the
    support set, each support image's embedding is its class's prototype, so the exported file puts every image in
    its own folder's class, at the place the record's `classes` gives it."""
    one_shot = tmp_path / "one_shot"
    for folder in sorted(folders["support"].iterdir()):
        _png(one_shot / folder.name / "only.png", np.asarray(Image.open(folder / "support0.png")))
    proc = metalearn("export", f"ckpt={proto_run}/checkpoints/last.ckpt", f"support={one_shot}", "format=torchscript",
                     f"out={tmp_path / 'proto.pt'}", check=True)
    assert "on 3 support images" in proc.stdout and "accuracy" not in proc.stdout  # no labelled queries: no accuracy
    record = json.loads((tmp_path / "proto.pt.json").read_text())
    assert record["classes"] == ["apple", "mango", "zebra"] and "accuracy" not in record
    x, names = _inputs(one_shot, record)
    predicted = torch.jit.load(str(tmp_path / "proto.pt"))(x).argmax(1).tolist()
    assert [record["classes"][i] for i in predicted] == names


def test_a_failed_check_keeps_the_file_under_another_name(metalearn, maml_run, folders, tmp_path, monkeypatch):
    """A runtime whose outputs are off by more than 1e-4: a clear error (exit 2), the file kept, named so, with its
    record, and nothing under the name asked for."""
    real = ExportFormat.run
    monkeypatch.setattr(ExportFormat, "run", lambda self, path, images: real(self, path, images) + 1e-3)
    out = tmp_path / "model.pt"
    proc = metalearn("export", f"ckpt={maml_run}/checkpoints/last.ckpt", f"support={folders['support']}",
                     "format=torchscript", f"out={out}")
    assert_clean_error(proc, "does not compute what the adapted network computes", "model.failed-check.pt", status=2)
    assert "checked: torch.jit.load vs PyTorch" in proc.stdout and "> 1e-4" in proc.stdout
    assert not out.exists() and not (tmp_path / "model.pt.json").exists()
    assert (tmp_path / "model.failed-check.pt").is_file()
    assert json.loads((tmp_path / "model.failed-check.pt.json").read_text())["check"]["passed"] is False


def test_bad_input_is_refused_before_anything_is_written(metalearn, maml_run, proto_run, folders, tmp_path, monkeypatch, trained_run):
    """Each a one-paragraph error with exit status 2, no traceback, and nothing written."""
    maml, proto = f"ckpt={maml_run}/checkpoints/last.ckpt", f"ckpt={proto_run}/checkpoints/last.ckpt"
    support = f"support={folders['support']}"
    two = tmp_path / "two"  # 2 classes: not the MAML head's 3
    for name in ("apple", "mango"):
        shutil.copytree(folders["support"] / name, two / name)
    empty = tmp_path / "empty"  # a class folder without images
    shutil.copytree(folders["support"], empty)
    for image in (empty / "mango").iterdir():
        image.unlink()
    (empty / "mango" / "notes.txt").write_text("no images here")
    other = tmp_path / "other_queries"
    shutil.copytree(folders["query"], other)
    (other / "zebra").rename(other / "horse")
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"an earlier export")
    cases = [
        ((maml, support, "task=0"), ("`support` and `task`", "both")),
        ((maml,), ("`support` and `task`", "neither")),
        ((maml, "task=600", f"out={tmp_path / 'new' / 'm.onnx'}"), ("`task` = 600", "0 .. 599", "eval.num_tasks")),
        ((maml, "task=first"), ("`task`", "'first'", "integer")),
        ((maml, support, "format=tflite"), ("`format`", "'tflite'", "onnx, torchscript")),
        ((maml, f"support={two}"), ("2 classes", "output layer of 3 classes", "algo=protonet, finetune")),
        ((proto, f"support={empty}"), ("'mango'", "holds no images", "notes.txt")),
        ((proto, support, "sampler.shots=3", "sampler.queries=1"), ("at least 3 images", "'apple' has 2", "sampler.shots=2")),
        ((proto, support, f"query={other}"), ("`query`", "'zebra'", "'horse'")),
        ((proto, f"support={tmp_path / 'nowhere'}"), ("`support`", "does not exist")),
        ((proto, support, f"out={taken}"), ("`out`", "already exists")),
        ((f"ckpt={trained_run.folder}/checkpoints/last.ckpt", "task=0"), ("image classification", "regression")),
    ]
    runs = {run: snapshot(run) for run in (maml_run, proto_run, trained_run.folder)}
    before = snapshot(tmp_path)
    for args, needles in cases:
        assert_clean_error(metalearn("export", *args), *needles, status=2)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the deploy extra not installed
    assert_clean_error(metalearn("export", proto, support, "format=onnx"), "onnxruntime", "pip install 'metalearn[deploy]'",
                       "format=torchscript", status=2)
    assert {run: snapshot(run) for run in runs} == runs and snapshot(tmp_path) == before
    assert not (tmp_path / "new").exists()  # not even the folder `out` names
