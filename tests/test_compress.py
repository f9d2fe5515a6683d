"""`metalearn compress`: pruning masks that hold through every inner step and meta-update of every algorithm
family, exactly the fraction asked for, the compress record, resume of meta-fine-tuning, the sparsity plot
of `metalearn report`, and bad input."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from conftest import assert_clean_error, metalearn_in_process, run_folders, write_grey_classes
from metalearn_cli.algorithms import MAML, MetaSGD, ProtoNet, Reptile
from metalearn_cli.algorithms.base import adapt
from metalearn_cli.algorithms.finetune import Finetune
from metalearn_cli.compression.footprint import load_sparse, save_sparse
from metalearn_cli.compression.pruning import Pruning, prunable_layers
from metalearn_cli.models import MLP, Conv4
from metalearn_cli.module import MetaLearner
from metalearn_cli.tasks import CLASSIFICATION, TaskBatch

TINY = ["trainer.enable_progress_bar=false", "eval.num_tasks=4", "compress.latency_repeats=3"]


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory) -> Path:
    """30 classes of four 16x16 grey PNGs (12/9/9 train/val/test classes with data.fractions=[0.4,0.3,0.3])."""
    return write_grey_classes(tmp_path_factory.mktemp("grey"), 30, 4)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, grey_folder) -> Path:
    """A 3-way 1-shot MAML checkpoint (conv4 of 8 channels) of two meta-iterations on `grey_folder`."""
    cwd = tmp_path_factory.mktemp("dense")
    proc = metalearn_in_process(
        "train", "data=folder", f"data.root={grey_folder}", "data.image_size=16", "data.channels=1",
        "data.fractions=[0.4,0.3,0.3]", f"data.cache_dir={cwd / 'cache'}", "algo=maml", "model.channels=8",
        "sampler.ways=3", "sampler.queries=2", "sampler.meta_batch_size=2", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "eval.val_tasks=2", "eval.num_tasks=2", "algo.eval_inner_steps=2",
        "algo.inner_lr=0.1", "trainer.enable_progress_bar=false", "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / "run" / "checkpoints" / "last.ckpt"


# -- masks through adaptation and meta-updates, every algorithm family ---------------------------------------
def tasks(seed: int, num_tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(num_tasks, 1)
    return TaskBatch(torch.randn(num_tasks, 3, 1, 8, 8, generator=g), labels, torch.randn(num_tasks, 6, 1, 8, 8, generator=g),
                     labels.repeat(1, 2), seed=seed, classes=labels)


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, step: int) -> list:
        return [tasks(step)]


def meta_train(module: MetaLearner, steps: int) -> None:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(Batches(), batch_size=None))


#: each family's algorithm, and the kernel its inner loop is checked on (batched: grouped convolutions; loop:
#: functional_call task after task)
FAMILIES = {
    "maml-batched": (lambda: MAML(inner_lr=0.5, inner_steps=2, eval_inner_steps=2, outer_lr=0.05, vectorize="batched"), "batched"),
    "maml-loop": (lambda: MAML(inner_lr=0.5, inner_steps=2, eval_inner_steps=2, outer_lr=0.05, vectorize="loop"), "loop"),
    "metasgd": (lambda: MetaSGD(inner_lr=0.5, inner_steps=2, eval_inner_steps=2, outer_lr=0.05, vectorize="batched"), "batched"),
    "reptile-adam": (lambda: Reptile(inner_lr=0.1, inner_steps=3, eval_inner_steps=2, outer_lr=1.0, inner_optimizer="adam"), "batched"),
    "protonet": (lambda: ProtoNet(outer_lr=0.05), None),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_survive_inner_steps_and_meta_updates(family):
    """Pruned weights are exactly zero after every inner step (each algorithm's own update: SGD, learned rates,
    Adam) and after meta-updates (a loss's gradient, Reptile's direction), while the others move."""
    torch.manual_seed(0)
    make, kernel = FAMILIES[family]
    algorithm = make()
    model = Conv4((1, 8, 8), 3, channels=4)
    extras = algorithm.extra_modules(model, SimpleNamespace(objective=CLASSIFICATION, name="grey"), None)
    module = MetaLearner(model, algorithm, CLASSIFICATION, {}, extras)
    module.prune(Pruning(0.5).masks(model))
    pruned = {name: ~mask for name, mask in module.fmodel.masks.items()}
    assert len(pruned) == 5 and all(m.any() for m in pruned.values())
    theta = {k: v.detach().clone() for k, v in module.fmodel.params().items()}
    for name, off in pruned.items():
        assert (theta[name][off] == 0).all()

    if algorithm.has_inner_loop:
        task_model = module.fmodel.on(kernel)
        seen = []

        def check(step, params):
            seen.append(step)
            for name, off in pruned.items():
                assert (params[name][:, off] == 0).all(), (step, name)

        adapted, _ = adapt(task_model, theta, tasks(0), 3, algorithm.inner_update(), after_step=check)
        assert seen == [1, 2, 3]
        assert any((adapted[k][0] != theta[k]).any() for k in theta)  # the kept weights adapted
        module.fmodel.pruning, masks = None, module.fmodel.pruning  # the same steps without masks fill the zeros
        unmasked, _ = adapt(task_model, theta, tasks(0), 3, algorithm.inner_update())
        module.fmodel.pruning = masks
        assert any((unmasked[name][:, off] != 0).any() for name, off in pruned.items())
        scores = algorithm.evaluate(module.fmodel, tasks(1), steps=2)  # evaluation adapts through the same loop
        assert scores.shape == (2, 3)

    meta_train(module, 3)
    after = dict(module.model.named_parameters())
    for name, off in pruned.items():
        assert (after[name][off] == 0).all(), name
        if algorithm.head_fixes_ways or not name.startswith("head."):  # prototypes need no head
            assert (after[name][~off] != theta[name][~off]).any(), name  # the kept weights were meta-learned


def test_finetune_backbone_keeps_its_zeros(monkeypatch):
    """The fine-tune baseline with finetune_backbone=true adapts the backbone by its own SGD with momentum and
    weight decay: every backbone it scores with has the pruned weights at zero."""
    torch.manual_seed(0)
    algorithm = Finetune(inner_lr=0.1, inner_steps=1, eval_inner_steps=3, outer_lr=0.01, finetune_backbone=True,
                         eval_weight_decay=0.1)
    model = Conv4((1, 8, 8), 3, channels=4)
    extras = algorithm.extra_modules(model, SimpleNamespace(objective=CLASSIFICATION, name="grey"),
                                     SimpleNamespace(train_classes=lambda: 10))
    module = MetaLearner(model, algorithm, CLASSIFICATION, {}, extras)
    module.prune(Pruning(0.6).masks(model))
    pruned = {name: ~mask for name, mask in module.fmodel.masks.items()}
    backbones = []
    features = TaskBatch.features

    def spy(self, task_model, params, which):
        backbones.append(params)
        return features(self, task_model, params, which)

    monkeypatch.setattr(TaskBatch, "features", spy)
    algorithm.evaluation(module.fmodel, tasks(2))
    assert len(backbones) == 1 + 2 * 3  # the queries before adapting, then support and queries at every step
    moved = False
    for params in backbones:
        for name, off in pruned.items():
            assert (params[name][:, off] == 0).all(), name
        moved |= any((params[k][0] != p).any() for k, p in module.fmodel.params().items())
    assert moved


# -- which weights, how many ------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75, 0.9])
@pytest.mark.parametrize("network", ["conv4", "mlp"])
def test_unstructured_pruning_zeroes_exactly_the_fraction_of_the_smallest(fraction, network):
    torch.manual_seed(1)
    model = Conv4((1, 16, 16), 5, channels=8) if network == "conv4" else MLP((1,), 1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    masks = Pruning(fraction).masks(model).by_name()
    assert {k: v.detach() for k, v in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())  # the model itself is left alone
    assert set(masks) == {f"{name}.weight" for name, _ in prunable_layers(model)}  # no bias, no batch norm
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(fraction * total)
    if fraction:  # global magnitude: no kept weight is smaller than a pruned one, across layers
        kept = torch.cat([before[k][m].abs() for k, m in masks.items()])
        cut = torch.cat([before[k][~m].abs() for k, m in masks.items()])
        assert kept.min() >= cut.max()


def test_structured_pruning_zeroes_whole_channels_and_combines_with_existing_masks():
    torch.manual_seed(2)
    model = Conv4((1, 16, 16), 5, channels=8)
    masks = Pruning(0.5, structured=True).masks(model).by_name()
    zero_units = 0
    for name, mask in masks.items():
        per_unit = mask.flatten(1)
        assert (per_unit.all(1) | ~per_unit.any(1)).all(), name  # each output channel kept or cut whole
        if name == "head.weight":
            assert mask.all()  # the classes are never pruned
        else:
            assert per_unit.all(1).any()  # every layer keeps a unit
            zero_units += int((~per_unit.any(1)).sum())
    assert zero_units == round(0.5 * 4 * 8)
    # pruning a pruned network keeps its zeros: a lower fraction changes nothing, a higher one adds to them
    from metalearn_cli.masks import ParameterMasks

    existing = ParameterMasks(masks)
    lower = Pruning(0.1).masks(model, existing).by_name()
    assert all(torch.equal(lower[k] & masks[k], lower[k]) for k in masks)
    higher = Pruning(0.8).masks(model, existing).by_name()
    assert all(not (higher[k] & ~masks[k]).any() for k in masks)


def test_sparse_storage_round_trips_and_is_smaller():
    torch.manual_seed(3)
    model = Conv4((1, 28, 28), 5, channels=64)
    masks = Pruning(0.75).masks(model)
    masks.zero_(model)
    state = model.state_dict()
    path = Path(__import__("tempfile").mkdtemp()) / "w.pt"
    size = save_sparse(state, masks.by_name(), path)
    loaded = load_sparse(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert buffer.getbuffer().nbytes / size > 3.0  # 9 bits a weight instead of 32 at 75% sparsity


# -- int8 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv4", "protonet", "cosine", "mlp"])
def test_int8_copy_runs_int8_kernels_and_stays_close_to_float(kind):
    """An adapted network's int8 copy: its convolutions (batch norm folded, ReLU fused) and linear layers are
    int8 modules, and its outputs stay close to the float network's on the calibration batch; heads without
    int8 kernels (prototype distances, cosine) run in float after it."""
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.intrinsic import quantized as nniq

    from metalearn_cli.compression.adapted import EmbeddingClassifier, PrototypeHead
    from metalearn_cli.compression.quantization import file_bytes, quantize_int8
    from metalearn_cli.models import CosineClassifier

    torch.manual_seed(0)
    if kind == "mlp":
        network, x = MLP((1,), 1).eval(), torch.linspace(-5, 5, 50)[:, None]
    else:
        conv = Conv4((1, 28, 28), 5, channels=32, bn="frozen")
        with torch.no_grad():
            for layer in conv.modules():
                if hasattr(layer, "running_var"):
                    layer.running_var.fill_(0.5)
        from metalearn_cli.compression.adapted import fixed_network
        from metalearn_cli.functional import FunctionalModel

        fmodel = FunctionalModel(conv.eval())
        x = torch.rand(25, 1, 28, 28)
        network = fixed_network(fmodel, {k: v.detach() for k, v in fmodel.params().items()}, x, 0)
        if kind == "protonet":
            network = EmbeddingClassifier(network, PrototypeHead(torch.randn(5, 32)))
        elif kind == "cosine":
            network = EmbeddingClassifier(network, CosineClassifier(32, 5, 10.0))
    int8 = quantize_int8(network, x)
    kinds = {type(m) for m in int8.modules()}
    assert (nniq.LinearReLU if kind == "mlp" else nniq.ConvReLU2d) in kinds
    assert kind in ("protonet", "cosine") or nnq.Linear in kinds
    with torch.no_grad():
        expected, got = network(x), int8(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).norm() <= 0.1 * expected.norm()
    if kind == "conv4":
        assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
        assert file_bytes(network) / file_bytes(int8) > 3.0


# -- the command ----------------------------------------------------------------------------------------------
def test_compress_record_report_and_the_compressed_checkpoint(metalearn, tmp_path, dense_ckpt):
    """A sweep of two compress runs: with prune=0 the compressed network scores exactly as the dense one on the
    same tasks; at 0.5 the record holds the sparsity and counts of the checkpoint it wrote, which `metalearn eval`
    scores with its masks; `metalearn report` on the sweep draws the sparsity plot."""
    proc = metalearn("compress", "-m", f"ckpt={dense_ckpt}", "compress.prune=0.0,0.5", *TINY, "hydra.sweep.dir=sweep", check=True)
    assert "paired difference on the same 4 tasks" in proc.stdout
    none, half = sorted(run_folders(tmp_path / "sweep"), key=lambda r: json.loads((r / "eval.json").read_text())["sparsity"])
    record = json.loads((none / "eval.json").read_text())
    assert record["sparsity"] == 0.0 and record["nonzero_parameters"] == record["parameters"]
    assert record["per_step"] == record["dense"]["per_step"] and record["difference"]["mean"] == 0.0
    assert record["dense"]["ckpt"] == str(dense_ckpt) and record["num_tasks"] == record["dense"]["num_tasks"] == 4
    assert json.loads((none / "test.json").read_text()) == record

    record = json.loads((half / "eval.json").read_text())
    for key in ("sparsity", "nonzero_parameters", "parameters", "file_bytes", "dense_file_bytes", "latency_ms", "dense",
                "compression", "per_step", "mean", "ci95"):
        assert key in record, key
    assert record["pruned_parameters"] == round(0.5 * record["prunable_parameters"])
    assert record["sparsity"] == record["pruned_parameters"] / record["prunable_parameters"]
    assert record["latency_ms"]["dense"] > 0 and record["latency_ms"]["compressed"] > 0 and record["latency_ms"]["repeats"] == 3
    assert record["compression"]["prune"] == 0.5 and record["compression"]["steps"] == 0
    assert record["task_seed"] == json.loads((none / "eval.json").read_text())["task_seed"]
    checkpoint = torch.load(half / "checkpoints/last.ckpt", weights_only=True)
    weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    params = [k for k in weights if not k.endswith(("running_mean", "running_var"))]
    assert sum(int(torch.count_nonzero(weights[k])) for k in params) == record["nonzero_parameters"]
    stored = load_sparse(half / "weights.sparse.pt")
    assert all(torch.equal(stored[k], weights[k]) for k in weights)
    assert (half / "weights.sparse.pt").stat().st_size == record["file_bytes"]
    rows = (half / "eval_tasks.csv").read_text().splitlines()
    assert rows[0].startswith("task,ways,support,query,dense_acc_step2,acc_step0") and len(rows) == 5

    scored = metalearn("eval", f"ckpt={half}/checkpoints/last.ckpt", "eval.num_tasks=4", check=True)
    assert "Error" not in scored.stderr
    assert json.loads((half / "eval.json").read_text())["per_step"] == record["per_step"]

    report = metalearn("report", str(tmp_path / "sweep"), check=True)
    assert (tmp_path / "sweep" / "report_sparsity.png").stat().st_size > 10_000, report.stdout


def test_meta_fine_tuning_keeps_the_zeros_and_resumes_exactly(metalearn, tmp_path, dense_ckpt):
    """Meta-fine-tuning keeps the masks in its checkpoints and moves the other weights; a run resumed from its
    step-1 checkpoint (Adam's moments, the stream of meta-batches) ends with the same weights and masks."""
    args = ["compress", f"ckpt={dense_ckpt}", "compress.prune=0.6", "compress.finetune_steps=2", "checkpoint.every_n_steps=1",
            "trainer.val_check_interval=2", "eval.val_tasks=2", *TINY]
    metalearn(*args, "checkpoint.keep_all=true", "hydra.run.dir=full", check=True)
    resumed = metalearn(*args, "hydra.run.dir=resumed", f"ckpt_path={tmp_path}/full/checkpoints/step-0000001.ckpt", check=True)
    assert "checkpoint.keep_all: True -> False" in resumed.stderr  # differences are listed, as train lists them
    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)
    again = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert full["global_step"] == again["global_step"] == 2
    for key, value in full["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
    dense = torch.load(dense_ckpt, weights_only=True)["state_dict"]
    masks = {k: v for k, v in full["state_dict"].items() if k.startswith("extras.masks.")}
    assert len(masks) == 5
    for key, mask in masks.items():
        name = "model." + key[len("extras.masks."):].replace("__", ".")
        weight = full["state_dict"][name]
        assert (weight[~mask] == 0).all() and (weight[mask] != dense[name][mask]).any(), name
    record = json.loads((tmp_path / "full/eval.json").read_text())
    assert record["compression"]["steps"] == 2 and record["compression"]["stream_start"] == 2  # after the dense run's 2
    assert (tmp_path / "full/metrics.csv").exists()

    wrong = metalearn(*[a.replace("prune=0.6", "prune=0.7") for a in args], "hydra.run.dir=wrong",
                      f"ckpt_path={tmp_path}/full/checkpoints/step-0000001.ckpt")
    assert_clean_error(wrong, "compress.prune=0.6", "compress.prune=0.7", "other masks", status=2)


def test_int8_record_scores_evaluations_predictor_quantized(metalearn, tmp_path, dense_ckpt):
    """compress.quantize=int8 alone: the checkpoint is scored once (compressed = dense), every task's float
    network gives evaluation's score after its last step (transductive batch norm fixed from the query batch),
    and the int8 copies are scored beside it, task by task, with their file size and latency."""
    metalearn("compress", f"ckpt={dense_ckpt}", "compress.quantize=int8", *TINY, "hydra.run.dir=q", check=True)
    record = json.loads((tmp_path / "q/eval.json").read_text())
    q = record["quantization"]
    assert record["compression"]["quantize"] == "int8" and record["per_step"] == record["dense"]["per_step"]
    assert q["bn_batch"] == "query" and q["engine"] in ("x86", "fbgemm", "qnnpack")
    assert q["float"]["mean"] == pytest.approx(record["mean"], abs=1e-6)
    assert 0 < q["file_bytes"] < q["float_file_bytes"]
    assert q["latency_ms"]["float"] > 0 and q["latency_ms"]["int8"] > 0 and q["latency_ms"]["queries"] == 6
    header, *rows = [line.split(",") for line in (tmp_path / "q/eval_tasks.csv").read_text().splitlines()]
    assert len(rows) == 4
    column = {name: i for i, name in enumerate(header)}
    int8 = [float(row[column["int8_acc_step2"]]) for row in rows]
    for row in rows:  # the float network is evaluation's predictor
        assert float(row[column["float_acc_step2"]]) == pytest.approx(float(row[column["acc_step2"]]), abs=1e-6)
    assert q["int8"]["mean"] == pytest.approx(np.mean(int8), abs=1e-6)
    assert q["difference"]["mean"] == pytest.approx(q["int8"]["mean"] - q["float"]["mean"], abs=1e-6)


@pytest.mark.parametrize("override, needles", [
    ("compress.quantize=int4", ["`compress.quantize`", "'int4'", "int8"]),
    ("compress.prune=1.0", ["`compress.prune`", "1.0", "[0, 1)"]),
    ("compress.prune=-0.25", ["`compress.prune`", "-0.25", "[0, 1)"]),
    ("compress.prune=most", ["`compress.prune`", "'most'", "[0, 1)"]),
    ("compress.finetune_steps=-1", ["`compress.finetune_steps`", "-1", ">= 0"]),
    ("compress.structured=maybe", ["`compress.structured`", "'maybe'", "true"]),
    ("trainer.max_steps=5", ["`trainer.max_steps`", "compress.finetune_steps"]),
    ("ckpt_path=x.ckpt", ["`ckpt_path`", "compress.finetune_steps` is 0"]),
])
def test_bad_input_is_a_clean_error(metalearn, tmp_path, dense_ckpt, override, needles):
    proc = metalearn("compress", f"ckpt={dense_ckpt}", override, *TINY, "hydra.run.dir=bad")
    assert_clean_error(proc, *needles, status=2)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_missing_checkpoint_and_unsupported_ones_are_clean_errors(metalearn):
    assert_clean_error(metalearn("compress", "compress.prune=0.5"), "`ckpt` is missing", "metalearn compress ckpt=", status=2)
    from metalearn_cli.compress import CompressSettings, check_supported
    from metalearn_cli.errors import MetalearnError
    from metalearn_cli.tasks.objectives import REINFORCEMENT
    from omegaconf import OmegaConf

    settings = CompressSettings.of(OmegaConf.create({"prune": 0.5, "structured": False, "finetune_steps": 10, "latency_repeats": 5}))
    source = SimpleNamespace(objective=REINFORCEMENT)
    episodes = SimpleNamespace(ckpt="rl.ckpt", record={"trained_on": "nav2d"}, parts=SimpleNamespace(source=source, algorithm=None))
    with pytest.raises(MetalearnError, match="supervised data"):
        check_supported(episodes, settings)
    trpo = MAML(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=0.1, outer_optimizer="trpo")
    classification = SimpleNamespace(ckpt="c.ckpt", record={"trained_on": "omniglot"},
                                     parts=SimpleNamespace(source=SimpleNamespace(objective=CLASSIFICATION), algorithm=trpo))
    with pytest.raises(MetalearnError, match="compress.finetune_steps=0"):
        check_supported(classification, settings)
    from metalearn_cli.models import GaussianMLP

    int8 = CompressSettings.of(OmegaConf.create({"prune": 0.0, "structured": False, "finetune_steps": 0, "latency_repeats": 5,
                                                 "quantize": "int8"}))
    policy = SimpleNamespace(ckpt="p.ckpt", record={"trained_on": "sinusoid"}, choices={"model": "gaussian_mlp"},
                             parts=SimpleNamespace(source=SimpleNamespace(objective=CLASSIFICATION), algorithm=None,
                                                   model=GaussianMLP((2,), 2)))
    with pytest.raises(MetalearnError, match="model=gaussian_mlp .GaussianMLP., has no int8 form"):
        check_supported(policy, int8)
