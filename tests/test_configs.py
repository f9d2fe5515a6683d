"""The real config groups compose, build and run a meta-iteration in-process."""

import pytest
import torch
from omegaconf import OmegaConf

from metalearn_cli.build import build_experiment
from metalearn_cli.config_checks import check_config
from metalearn_cli.errors import MetalearnError

ALGOS = ["maml", "fomaml", "reptile", "finetune"]


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_builds_and_takes_a_meta_step(compose_cfg, algo):
    cfg = compose_cfg(f"algo={algo}", "sampler.meta_batch_size=4")
    experiment = build_experiment(cfg)
    module, sampler = experiment.module, experiment.sampler
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    step = experiment.algorithm.meta_step(module.fmodel, sampler.train_batch(cfg.seed, 0))
    assert (step.loss is None) == (algo == "reptile")
    assert torch.isfinite(step.metrics["loss"])
    # computing a meta-step never changes the model in place
    assert all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())
    scores = experiment.algorithm.evaluate(module.fmodel, sampler.fixed_tasks("val", 3, 0))
    assert scores.shape == (3, cfg.algo.eval_inner_steps + 1)


def test_data_and_tuning_configs_override_the_defaults_in_train_yaml(compose_cfg):
    """A data config's settings win over train.yaml's own (its defaults list puts _self_ first), and the
    command line wins over both: data/omniglot.yaml's 200 validation tasks were once silently 600."""
    assert compose_cfg().eval.val_tasks == 600
    for data in ("omniglot", "mnist", "cifar_fs", "miniimagenet", "folder"):
        assert compose_cfg(f"data={data}").eval.val_tasks == 200, data
    assert compose_cfg("data=omniglot", "eval.val_tasks=50").eval.val_tasks == 50
    cfg = compose_cfg("data=omniglot", "algo=reptile")
    assert cfg.trainer.max_steps == 100000 and cfg.algo.inner_state == "carry"  # tuning/reptile_omniglot.yaml
    assert cfg.eval.num_tasks == 600 and cfg.seed == 0 and cfg.checkpoint.every_n_steps == 1000  # train.yaml's own


def test_defaults_are_the_maml_paper_sinusoid_experiment(compose_cfg):
    cfg = compose_cfg()
    assert cfg.data._target_.endswith("Sinusoid")
    assert list(cfg.data.amplitude) == [0.1, 5.0] and list(cfg.data.x_range) == [-5.0, 5.0]
    assert cfg.algo.inner_lr == 0.01 and cfg.algo.inner_steps == 1 and cfg.algo.outer_lr == 0.001
    assert cfg.algo.first_order is False and cfg.algo.eval_inner_steps == 10
    assert cfg.sampler.train_shots == 10 and cfg.sampler.shots == 5 and cfg.sampler.meta_batch_size == 25
    assert cfg.trainer.max_steps == 70000 and cfg.trainer.accelerator == "auto"
    model = build_experiment(cfg).module.model
    assert [tuple(p.shape) for p in model.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def test_fomaml_is_maml_with_first_order(compose_cfg):
    maml, fomaml = compose_cfg("algo=maml").algo, compose_cfg("algo=fomaml").algo
    assert fomaml.first_order is True
    assert {k: v for k, v in fomaml.items() if k != "first_order"} == {k: v for k, v in maml.items() if k != "first_order"}


@pytest.mark.parametrize(
    "key, value",
    [("sampler.shots", 0), ("sampler.ways", 1), ("algo.inner_lr", float("nan")), ("algo.outer_lr", True),
     ("seed", -1), ("eval.num_tasks", 0), ("algo.inner_steps", 1.5)],
)
def test_check_config_names_key_and_value(compose_cfg, key, value):
    """The run's keys are checked by check_config; the others by the class that owns them, as it is
    built (before the data is read for the sampler and the algorithm); either way the message names
    the full key and the value."""
    from metalearn_cli.build import build_tasks

    cfg = compose_cfg()
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(MetalearnError) as error:
        build_tasks(cfg)
    assert f"`{key}`" in str(error.value) and repr(value) in str(error.value)
    owned = not key.startswith(("seed", "eval."))
    if owned:  # checked once, by its owner: the run's own checks let it through
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], 10),  # sinusoid MLP: 70000 steps, validation every 2500, logs every 100, checkpoints every 1000
        (["trainer.val_check_interval=25"], 5),
        (["trainer.max_steps=2504"], 4),
        (["trainer.max_steps=101"], 1),
        (["checkpoint.every_n_steps=0", "trainer.log_every_n_steps=4"], 4),
        (["iterations_per_batch=20"], 20),
        (["data=omniglot", "data.root=/nowhere"], 1),  # conv4: one meta-iteration is hundreds of ms
    ],
)
def test_iterations_per_batch_divides_every_cadence(compose_cfg, overrides, expected):
    from metalearn_cli.config_checks import iterations_per_batch

    assert iterations_per_batch(compose_cfg(*overrides)) == expected
