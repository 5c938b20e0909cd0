"""Checks that run before any model loads, and the resolved config saved with each run."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from alignlab.data.mixture import check_sources
from alignlab.data.options import check_max_rows
from alignlab.data.streaming import check_streaming
from alignlab.errors import ConfigError
from alignlab.models.loading import check_model_config
from alignlab.runner.hardware import check_hardware
from alignlab.runner.preflight import ALGORITHM_META_KEYS, CONFIG_DIR, check_model_path, unknown_key_error
from alignlab.runner.redact import redact, redact_overrides
from alignlab.runner.sweeps import name_run

# The bundled data config of each data kind, for error messages.
BUNDLED = {"sft": "arith_sft", "pairwise": "arith_pairs", "labelled": "arith_kto", "prompt": "arith_prompts"}


def data_kind(cfg: DictConfig) -> str:
    return get_class(cfg.data._target_).kind


# The data module that reads pairs as labelled rows (data.unpair=true).
LABELLED_DATA = "alignlab.data.LabelledDataModule"


def unpair_pairs(cfg: DictConfig, choices: dict) -> None:
    """`data.unpair=true` on a pairwise data config (custom_pairs, arith_pairs, shapes_pairs) for an
    algorithm that trains on labelled rows (KTO): the pairs are read by LabelledDataModule, which splits
    each into a desirable and an undesirable row, as `data=custom_kto data.unpair=true` does. Sets
    `cfg.data._target_` so that the saved config.yaml says which module read the data."""
    if not cfg.data.get("unpair") or data_kind(cfg) != "pairwise":
        return
    if "labelled" not in cfg.algorithm.data_kinds:
        raise ConfigError(
            f"data.unpair=true splits each pair into a desirable and an undesirable row for a labelled-data "
            f"algorithm (algorithm=kto); algorithm={choices.get('algorithm', cfg.algorithm.name)} trains on "
            f"{' or '.join(cfg.algorithm.data_kinds)} data: drop data.unpair"
        )
    cfg.data._target_ = LABELLED_DATA


def check_config(cfg: DictConfig, choices: dict | None = None) -> None:
    """Raise ConfigError for anything knowable before a model loads. Pairs with `data.unpair=true` for
    KTO become labelled data here (unpair_pairs), the one change made to `cfg`."""
    choices = choices or {}
    unpair_pairs(cfg, choices)
    kind, accepted = data_kind(cfg), list(cfg.algorithm.data_kinds)
    if kind not in accepted:
        hint = f"pick a data config of that kind (e.g. data={BUNDLED[accepted[0]]})"
        if kind == "pairwise" and "labelled" in accepted:
            hint += (
                " or, to train on these preference pairs, add data.unpair=true to the command (each pair becomes "
                "a desirable row, its chosen answer, and an undesirable one, its rejected answer)"
            )
        raise ConfigError(
            f"algorithm={choices.get('algorithm', cfg.algorithm.name)} needs {' or '.join(accepted)} data, but "
            f"data={choices.get('data', cfg.data._target_)} provides {kind} data; {hint}."
        )
    missing = OmegaConf.missing_keys(cfg)
    if cfg.data.get("sources"):  # a mixture's specs give the paths
        missing.discard("data.source.path")
        check_sources(cfg.data.sources)
    if missing:
        raise ConfigError(f"required config value(s) not set: {', '.join(sorted(missing))}")
    check_data_options(cfg.data)
    if cfg.data.get("source") is not None:
        check_max_rows(cfg.data.source.get("max_rows"))
    check_streaming(cfg.data, cfg.algorithm, kind)
    check_model_config(cfg.model)
    check_hardware(cfg.trainer, choices.get("hardware"))
    algorithm_class = get_class(cfg.algorithm._target_)
    check_algorithm_keys(cfg.algorithm, algorithm_class, choices.get("algorithm", cfg.algorithm.name))
    algorithm_class.check_config(cfg.algorithm)
    algorithm_class.check_run(cfg)
    algorithm_class.check_optim(cfg.optim)


def check_data_options(data: DictConfig) -> None:
    """data's settings, by the checks its module class runs on its arguments (`check_options`,
    alignlab.data.options): each data key is checked in that one place, here before any model loads."""
    get_class(data._target_).check_options(data)


def check_algorithm_keys(algorithm: DictConfig, algorithm_class: type, choice: str) -> None:
    """A key the algorithm does not take (e.g. `+algorithm.betta=0.2`) is refused with the closest
    valid name, here rather than by the module's constructor once the model has loaded."""
    hparams = algorithm_class.hparam_names()  # conf/algorithm/'s keys for that class
    for key in algorithm:
        if key not in ("_target_", *hparams, *ALGORITHM_META_KEYS):
            raise unknown_key_error("algorithm", choice, key, hparams)


def task_overrides() -> list[str]:
    """This job's overrides (command line and sweeper), secrets redacted; [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return redact_overrides(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized() else []


def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True))


def save_resolved_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))


def compose(overrides: list[str] | None = None, output_dir: str | Path = "outputs/composed") -> DictConfig:
    """The config `python -m alignlab OVERRIDES` would run, for use from Python (tests, studies).

    Hydra's runtime values (the run folder) and the run name are filled in, since no Hydra app runs.
    Raises ConfigError where the command line would stop before Hydra: a `model.path` that the
    embedded tiny model would replace (alignlab.runner.preflight.check_model_path).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict

    parsed = OverridesParser.create().parse_overrides(list(overrides or []))
    check_model_path({o.key_or_group: o for o in parsed})  # as on the command line (alignlab.runner.preflight)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides or []), return_hydra_config=True)
    overrides, choices = list(cfg.hydra.overrides.task), dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    name_run(cfg, None, overrides, choices)
    return cfg
