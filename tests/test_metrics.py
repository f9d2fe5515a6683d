"""Classification scores beyond accuracy: macro-F1 and mean per-class recall of the query predictions
after the last adaptation step, per task, summarised as mean ± 95% CI over tasks (eval.json, test.json,
the printed table, the loggers); regression reports neither."""

import dataclasses
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from metalearn_cli.algorithms import MAML, Finetune, FunctionalModel, ProtoNet
from metalearn_cli.algorithms.base import adapt
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.models import MLP
from metalearn_cli.module import MetaLearner
from metalearn_cli.samplers import TaskChunks
from metalearn_cli.stats import format_table, mean_ci95
from metalearn_cli.tasks import CLASSIFICATION, REGRESSION
from metalearn_cli.tasks.objectives import classification_report

WAYS = 4


def _reference(true: list[int], predicted: list[int]) -> tuple[float, float]:
    """scikit-learn's definitions, class by class: the labels are those among the true and predicted
    ones; a 0/0 precision or recall counts as 0, and so does the F1 of a class with both 0."""
    f1s, recalls = [], []
    for c in sorted(set(true) | set(predicted)):
        tp = sum(t == c and p == c for t, p in zip(true, predicted))
        n_pred, n_true = predicted.count(c), true.count(c)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        recalls.append(recall)
    return sum(f1s) / len(f1s), sum(recalls) / len(recalls)


def test_macro_f1_and_recall_match_scikit_learns_definitions():
    generator = torch.Generator().manual_seed(0)
    T, Q, N = 7, 12, 5
    logits = torch.randn(T, Q, N, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, N, (T, Q), generator=generator)
    logits[0, :, 3] = -math.inf  # task 0 never predicts class 3: precision 0/0
    logits[1, :, :2] = -math.inf  # task 1 predicts neither 0 nor 1 ...
    labels[1] = torch.arange(Q) % 3 + 2  # ... and has only classes 2-4 ...
    logits[1, :4, 1] = 10.0  # ... but predicts class 1, absent from its labels, 4 times
    labels[2] = torch.arange(Q) % N  # an imbalanced query set elsewhere: 3, 3, 2, 2, 2
    report = classification_report(logits, labels)
    assert set(report) == set(CLASSIFICATION.report_names) == {"macro_f1", "macro_recall"}
    predicted = logits.argmax(-1)
    assert not (predicted[0] == 3).any() and (labels[0] == 3).any() and (predicted[1] == 1).sum() == 4
    expected = [_reference(labels[t].tolist(), predicted[t].tolist()) for t in range(T)]
    torch.testing.assert_close(report["macro_f1"], torch.tensor([e[0] for e in expected], dtype=torch.float64))
    torch.testing.assert_close(report["macro_recall"], torch.tensor([e[1] for e in expected], dtype=torch.float64))
    try:  # the library itself, where it is installed
        from sklearn.metrics import f1_score, recall_score
    except ImportError:
        pass
    else:
        for t in range(T):
            y, p = labels[t].numpy(), predicted[t].numpy()
            assert report["macro_f1"][t].item() == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
            assert report["macro_recall"][t].item() == pytest.approx(recall_score(y, p, average="macro", zero_division=0))
    # with the same number of queries of every class, the mean per-class recall is the accuracy
    balanced = torch.arange(Q).remainder(3).expand(T, Q)
    accuracy = (logits[..., :3].argmax(-1) == balanced).double().mean(1)
    torch.testing.assert_close(classification_report(logits[..., :3], balanced)["macro_recall"], accuracy)
    assert REGRESSION.task_report(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)) == {} and REGRESSION.report_names == ()


def _image_tasks(num_tasks=5, shots=2, queries=3, seed=0):
    torch.manual_seed(seed)
    images = [torch.randint(0, 256, (shots + queries, 1, 6, 6), dtype=torch.uint8) for _ in range(2 * WAYS)]
    classes = ImageClasses.from_lists(images, [str(i) for i in range(2 * WAYS)])
    source = ImageTasks({"train": classes, "val": classes, "test": classes}, name="tiny")
    batch = source.sample("test", torch.Generator().manual_seed(seed), num_tasks, WAYS, shots, queries)
    return source, dataclasses.replace(batch, support_x=batch.support_x.double(), query_x=batch.query_x.double())


def _model():
    torch.manual_seed(1)
    return MLP((1, 6, 6), WAYS, hidden=(16,)).double()


def test_evaluation_reports_them_from_the_last_steps_predictions():
    """MAML's evaluation (3 of 5 tasks per pass: the report is joined over parts like the scores): the
    report is that of the query logits after the last step, and the accuracies are those of evaluate."""
    _, tasks = _image_tasks()
    model = _model()
    fmodel = FunctionalModel(model)
    algo = MAML(inner_lr=0.5, inner_steps=1, eval_inner_steps=2, outer_lr=1e-3, task_chunk=3)
    evaluation = algo.evaluation(fmodel, tasks)
    torch.testing.assert_close(evaluation.scores, algo.evaluate(fmodel, tasks), rtol=0, atol=0)
    assert evaluation.scores.shape == (5, 3) and list(evaluation.report) == ["macro_f1", "macro_recall"]
    theta = {k: v.detach() for k, v in fmodel.params().items()}
    task_model = fmodel.on("batched")  # the kernel evaluation runs with, in float64
    adapted, _ = adapt(task_model, theta, tasks, 2, algo.eval_optimizer())
    logits = task_model(adapted, tasks.query_x, 2).detach()
    expected = classification_report(logits, tasks.query_y)
    for name in expected:
        torch.testing.assert_close(evaluation.report[name], expected[name])
    torch.testing.assert_close(evaluation.scores[:, -1], (logits.argmax(-1) == tasks.query_y).double().mean(1))
    torch.testing.assert_close(evaluation.report["macro_recall"], evaluation.scores[:, -1])  # balanced query sets
    assert (evaluation.report["macro_f1"] <= 1).all() and (evaluation.report["macro_f1"] >= 0).all()
    none = algo.evaluation(fmodel, tasks, steps=0)  # no adaptation: the report of theta's predictions
    torch.testing.assert_close(none.report["macro_recall"], none.scores[:, 0])


@pytest.mark.parametrize("algo", ["protonet", "finetune"])
def test_algorithms_that_evaluate_their_own_way_report_them_too(algo):
    source, tasks = _image_tasks()
    model = _model()
    fmodel = FunctionalModel(model)
    if algo == "protonet":
        algorithm = ProtoNet(outer_lr=1e-3)
    else:  # Baseline: a new head per task on the frozen features
        algorithm = Finetune(inner_lr=0.01, inner_steps=1, eval_inner_steps=3, outer_lr=1e-3, eval_inner_lr=0.5)
        algorithm.extra_modules(model, source, None)
    evaluation = algorithm.evaluation(fmodel, tasks)
    torch.testing.assert_close(evaluation.scores, algorithm.evaluate(fmodel, tasks), rtol=0, atol=0)
    assert list(evaluation.report) == ["macro_f1", "macro_recall"]
    assert all(v.shape == (5,) and torch.isfinite(v).all() for v in evaluation.report.values())
    torch.testing.assert_close(evaluation.report["macro_recall"], evaluation.scores[:, -1])


def test_an_algorithm_cannot_override_evaluate_alone():
    """The module asks for `evaluation`; an override of `evaluate` would be skipped silently."""
    with pytest.raises(TypeError, match="override Algorithm.evaluation"):
        type("Scored", (MAML,), {"evaluate": lambda self, fmodel, tasks, steps=None: None})


def _test_through_lightning(tmp_path, objective, model, algorithm, tasks):
    module = MetaLearner(model, algorithm, objective, metadata={})
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, inference_mode=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, dataloaders=DataLoader(TaskChunks(tasks, 2), batch_size=None), verbose=False)
    return module.summaries["test"], trainer.callback_metrics


def test_the_module_summarises_logs_and_prints_them_for_classification(tmp_path):
    _, tasks = _image_tasks()
    model = _model()
    algo = MAML(inner_lr=0.5, inner_steps=1, eval_inner_steps=2, outer_lr=1e-3)
    evaluation = algo.evaluation(FunctionalModel(model), tasks)
    summary, logged = _test_through_lightning(tmp_path, CLASSIFICATION, model, algo, tasks)
    # accuracy keeps its fields and meaning
    assert (summary["mean"], summary["ci95"]) == pytest.approx(mean_ci95(evaluation.scores[:, -1]))
    assert [row["step"] for row in summary["per_step"]] == [0, 1, 2] and summary["num_tasks"] == 5
    for name in ("macro_f1", "macro_recall"):
        assert summary[name] == pytest.approx(dict(zip(("mean", "ci95"), mean_ci95(evaluation.report[name]))))
        assert math.isfinite(summary[name]["ci95"]) and summary[name]["ci95"] > 0
        assert logged[f"test/{name}"].item() == pytest.approx(summary[name]["mean"])
        assert logged[f"test/{name}_ci95"].item() == pytest.approx(summary[name]["ci95"])
    assert list(summary)[:5] == ["metric", "mean", "ci95", "macro_f1", "macro_recall"]
    json.dumps(summary)  # what eval.json, test.json and evals.jsonl are written from
    table = format_table(summary).splitlines()
    f1 = summary["macro_f1"]
    assert table[-2] == f"macro_f1 after 2 steps: {f1['mean'] * 100:.4f}% ± {f1['ci95'] * 100:.4f}%"
    assert table[-1].startswith("macro_recall after 2 steps: ") and len(table) == 1 + 3 + 2


def test_regression_reports_nothing_more(tmp_path):
    tasks = Sinusoid().sample("test", torch.Generator().manual_seed(0), 4, None, 5, 5)
    torch.manual_seed(1)
    model = MLP((1,), 1, hidden=(8,))
    algo = MAML(inner_lr=0.01, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3)
    assert algo.evaluation(FunctionalModel(model), tasks).report == {}
    summary, logged = _test_through_lightning(tmp_path, REGRESSION, model, algo, tasks)
    assert not any(isinstance(v, dict) for v in summary.values()) and "test/mse" in logged
    assert not any("macro" in k for k in logged) and "macro" not in format_table(summary)


def test_a_regression_run_writes_test_json_as_before(trained_run):
    """The shared sinusoid run: test.json and the printed table carry no classification scores."""
    test = json.loads((trained_run.folder / "test.json").read_text())
    assert test["metric"] == "mse" and "per_step" in test and "macro_f1" not in test and "macro_recall" not in test
    assert "macro" not in trained_run.stdout
