"""Every option of every config group composes, and instantiates where this machine can run it."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
from omegaconf import OmegaConf, read_write

from storyexp.errors import MissingResourceError
from storyexp.tasks import build_callbacks, build_loggers, build_model, refuse_multirun_with_subprocess_ddp

from .conftest import CONF, TINY_DEMO, compose_cfg


def resolve_all(cfg) -> None:
    """Resolve every interpolation outside the (read-only) hydra node."""
    for key in cfg:
        if key != "hydra" and OmegaConf.is_config(cfg[key]):
            OmegaConf.resolve(cfg[key])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ("model", "data", "trainer", "logger", "callbacks", "eval", "experiment", "hparams_search",
                  "launcher", "paths", "hydra", "debug"):
        assert options(group), group
    assert {"arldm", "arldm_tiny", "arldm_demo"} <= set(options("model"))
    assert {"demo", "pororo", "flintstones", "ssid"} <= set(options("data"))
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"wandb", "csv", "tensorboard"} <= set(options("logger"))


def test_default_config_is_the_demo(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.task == "train"
    assert cfg.data.name == "demo" and cfg.model.network.source == "sizes"
    assert cfg.optimized_metric == "val/loss"
    # the model reads task, characters and caption length from the data config
    assert cfg.model.task == cfg.data.task and list(cfg.model.characters) == list(cfg.data.characters)
    assert cfg.model.max_length == cfg.data.max_length


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name, tmp_path):
    cfg = compose_cfg([f"data={name}"], tmp_path)
    resolve_all(cfg)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, L.LightningDataModule)
    assert dm.task in ("continuation", "visualization")
    if name != "demo":  # real datasets are not here: a clear message naming the file and where to get it
        with pytest.raises(MissingResourceError, match=rf"{name} dataset file is missing.*{cfg.data.path}"):
            dm.check_available()


@pytest.mark.parametrize("name", ["arldm_tiny", "arldm_demo"])
def test_model_options_from_sizes_instantiate(name, tmp_path):
    cfg = compose_cfg([f"model={name}"], tmp_path)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert model.task == cfg.data.task and model.image_size == cfg.model.image_size
    # character names are single tokens in both tokenizers
    for name_ in cfg.data.characters:
        assert len(model.clip_tokenizer.tokenize(name_)) == 1
        assert len(model.blip_tokenizer.tokenize(name_)) == 1


def test_published_model_reports_missing_weights(tmp_path):
    cfg = compose_cfg(["model=arldm", "data=pororo"], tmp_path)
    assert cfg.model.image_size == 512 and cfg.model.sampler.num_inference_steps == 250
    with pytest.raises(MissingResourceError) as err:
        build_model(cfg)
    message = str(err.value)
    assert "stable-diffusion-v1-5" in message and "model_large.pth" in message


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose(name, tmp_path):
    cfg = compose_cfg([f"trainer={name}"], tmp_path)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    resolve_all(cfg)
    if cfg.trainer.accelerator in ("auto", "cpu") and cfg.trainer.get("strategy", "auto") == "auto":
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert trainer.max_epochs == cfg.model.recipe.max_epochs
        assert trainer.gradient_clip_val == cfg.model.recipe.gradient_clip_val


def test_ddp_cpu_trainer_instantiates(tmp_path):
    cfg = compose_cfg(["trainer=ddp_cpu"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name, tmp_path):
    cfg = compose_cfg([f"logger={name}"], tmp_path)
    loggers = build_loggers(cfg)
    expected = {"csv": ["CSVLogger"], "wandb": ["WandbLogger"], "tensorboard": ["TensorBoardLogger"],
                "default": ["CSVLogger", "WandbLogger"], "none": []}[name]
    assert sorted(type(lg).__name__ for lg in loggers) == expected


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_instantiate(name, tmp_path):
    cfg = compose_cfg([f"callbacks={name}"], tmp_path)
    callbacks = build_callbacks(cfg)
    assert all(isinstance(cb, L.Callback) for cb in callbacks)
    if name == "default":
        names = {type(cb).__name__ for cb in callbacks}
        assert {"ModelCheckpoint", "StoryGridLogger", "StoryEvaluation", "ValidationMetrics", "LearningRateMonitor"} <= names


@pytest.mark.parametrize("name", options("eval"))
def test_eval_options_instantiate(name, tmp_path):
    cfg = compose_cfg([f"eval={name}"], tmp_path)
    callbacks = build_callbacks(cfg)
    evaluation = [cb for cb in callbacks if type(cb).__name__ == "StoryEvaluation"]
    assert len(evaluation) == 1 and evaluation[0].metric_names == list(cfg.eval.metrics)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name, tmp_path):
    cfg = compose_cfg([f"experiment={name}"], tmp_path)
    resolve_all(cfg)
    assert cfg.model.task == cfg.data.task
    assert name.split("_")[0] in {*cfg.tags, "demo"}


# hparams_search presets (keys, objective rule) and the W&B sweep files: tests/test_sweeps.py


def test_every_model_family_has_a_search():
    families = {m.split("_")[0] for m in options("model")} - {"vqgan"}
    assert {f"{f}_optuna" for f in families} <= set(options("hparams_search"))


@pytest.mark.parametrize("name", options("launcher"))
def test_launcher_options_compose(name, tmp_path):
    cfg = compose_cfg([f"launcher={name}", "trainer=ddp"], tmp_path)
    target = cfg.hydra.launcher._target_
    expected = {"local": "BasicLauncher", "slurm": "ResumingSlurmLauncher", "submitit_local": "ResumingLocalLauncher"}
    assert target.endswith(expected[name])
    if name == "slurm":
        assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices


def test_multirun_with_subprocess_ddp_is_refused(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from storyexp.errors import ConfigurationError

    def multirun(overrides):
        cfg = compose_cfg(overrides, tmp_path)
        with read_write(cfg.hydra):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig().set_config(cfg)
        return cfg

    with pytest.raises(ConfigurationError, match="launcher=slurm"):
        refuse_multirun_with_subprocess_ddp(multirun(["trainer=ddp_cpu"]))
    refuse_multirun_with_subprocess_ddp(multirun(["trainer=cpu"]))  # one process per job: fine
    refuse_multirun_with_subprocess_ddp(multirun(["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"]))


def test_tiny_overrides_compose(tmp_path):
    cfg = compose_cfg(TINY_DEMO + ["model=arldm_tiny", "data.task=visualization"], tmp_path)
    assert cfg.model.task == "visualization" and cfg.data.demo.n_train == 48
