"""Config composition for every group option, and clear errors for wrong configs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignlab.errors import ConfigError
from alignlab.runner.config import check_config, save_resolved_config
from alignlab.runner.redact import redact
from tests.conftest import CONF, compose, run_cli

GROUPS = ["algorithm", "model", "data", "hardware", "logger", "trainer", "callbacks", "paths"]
HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


# Each algorithm's and data config's section as main composed it before the shared blocks moved into
# conf/_partials/ (and the root max_length, which the custom_* data configs set): the partials change no value.
COMPOSED_BEFORE_PARTIALS = Path(__file__).with_name("composed_options.json")
# Keys added since that golden was made, by option: {option: {key: value}}.
CUSTOM = ("custom_kto", "custom_pairs", "custom_prompts", "custom_sft")
ADDED_SINCE = {f"data={o}": {"row_converter": None} for o in CUSTOM}
CORRECTION = {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_min": None}  # issue 34
KL_LOSS = {"use_bias_correction_kl": False}  # issue 34
ADDED_SINCE |= {
    "algorithm=ppo": {**CORRECTION, **KL_LOSS},
    "algorithm=grpo": {**CORRECTION, "off_policy_mask_threshold": None, "kl_estimator": "k3", **KL_LOSS},
}


def composed_before(option: str) -> dict:
    """The section `option` (`group=name`) composed to before the partials, with the keys added since."""
    group = option.split("=")[0]
    return {**json.loads(COMPOSED_BEFORE_PARTIALS.read_text())[option][group], **ADDED_SINCE.get(option, {})}


def test_partials_change_no_composed_value_and_are_no_option():
    """conf/_partials/ (the vLLM block, the keys every data config has, those of the file configs) is
    included with `defaults:`. Every algorithm and data option composes to the values it had before, which
    is what preflight, the generated docs and run names read too (load_option follows the same chain);
    and no partial is an `algorithm=` or `data=` option."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import MissingConfigException

    from alignlab.runner.preflight import load_option, preflight

    golden = json.loads(COMPOSED_BEFORE_PARTIALS.read_text())
    for option in golden:  # (Hydra's composition of each: test_every_group_option_composes)
        group, name = option.split("=")
        assert OmegaConf.to_container(load_option(group, name)) == composed_before(option), option
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(MissingConfigException) as listed:
            hydra_compose("train", ["algorithm=vllm"])
    assert "vllm" not in str(listed.value).split("Available options")[-1]
    # the command-line key check (before Hydra) knows a partial's keys, for the options that include it only
    preflight(["algorithm=grpo", "algorithm.vllm_mode=server", "algorithm.use_vllm=true"])
    with pytest.raises(ConfigError, match="algorithm.vllm_mode is not a setting of algorithm=dpo"):
        preflight(["algorithm=dpo", "algorithm.vllm_mode=server"])
    assert sorted(golden) == [f"{g}={p.stem}" for g in ("algorithm", "data") for p in sorted((CONF / g).glob("*.yaml"))]
    for group in ("algorithm", "data"):  # a sub-folder's file would be an option (`data=custom/x`)
        assert sorted((CONF / group).rglob("*.yaml")) == sorted((CONF / group).glob("*.yaml"))


def test_a_partial_after_self_may_not_set_the_files_own_keys(tmp_path, monkeypatch):
    """Hydra lets a partial merged after `_self_` win over the file: load_option refuses that layout."""
    from alignlab.runner import preflight

    (tmp_path / "algorithm").mkdir()
    (tmp_path / "_partials").mkdir()
    (tmp_path / "_partials" / "p.yaml").write_text("beta: 2.0\nuse_vllm: false\n")
    (tmp_path / "algorithm" / "x.yaml").write_text("defaults:\n  - _self_\n  - /_partials/p@_here_\nbeta: 0.1\n")
    monkeypatch.setattr(preflight, "CONFIG_DIR", tmp_path)
    refused = r"conf/algorithm/x.yaml sets \['beta'\], which .*p.yaml \(included after _self_\)"
    with pytest.raises(ConfigError, match=refused):
        preflight.load_option("algorithm", "x")
    (tmp_path / "algorithm" / "x.yaml").write_text("defaults:\n  - /_partials/p@_here_\n  - _self_\nbeta: 0.1\n")
    assert dict(preflight.load_option("algorithm", "x")) == {"beta": 0.1, "use_vllm": False}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose([f"{group}={option}"], output_dir=tmp_path)
    if group in ("algorithm", "data"):  # the shared blocks in conf/_partials/ changed no value
        assert OmegaConf.to_container(cfg[group]) == composed_before(f"{group}={option}")
        if group == "data":
            assert cfg.max_length == json.loads(COMPOSED_BEFORE_PARTIALS.read_text())[f"data={option}"]["max_length"]
    OmegaConf.resolve(cfg)
    if group == "algorithm":
        assert cfg.algorithm.name == option
        # an algorithm brings data of a kind it accepts, so its default run is valid once every
        # required value is given (PPO needs a reward: a reward model folder or rule rewards; GKD a teacher)
        assert not OmegaConf.missing_keys(cfg)
        if option == "ppo":
            with pytest.raises(ConfigError, match="algorithm=ppo needs a reward"):
                check_config(cfg)
            check_config(compose(["algorithm=ppo", "algorithm.reward_funcs=[accuracy]"], output_dir=tmp_path))
        elif option == "gkd":  # GKD needs a teacher (tests/algorithms/test_gkd.py checks one)
            with pytest.raises(ConfigError, match="algorithm.teacher_model_name_or_path is not set"):
                check_config(cfg)
        else:
            check_config(cfg)
    if group == "data":
        if OmegaConf.missing_keys(cfg.data):
            assert OmegaConf.missing_keys(cfg.data) == {"data.source.path"}
        else:
            assert hasattr(instantiate(cfg.data), "setup")
    if group == "hardware":
        assert cfg.trainer.accelerator == ("cpu" if option in ("cpu", "ddp_cpu") else "gpu")
        if option == "deepspeed" and not importlib.util.find_spec("deepspeed"):
            pass  # an optional install; tests/runner/test_hardware.py checks the message that says so
        elif cfg.trainer.accelerator == "gpu" and not HAS_GPU:
            with pytest.raises(ConfigError, match=f"hardware={option} .* needs a CUDA GPU"):
                check_config(cfg, {"hardware": option})
        else:
            check_config(cfg)
    if group == "logger":
        assert ("csv" in cfg.logger) == (option in ("csv", "wandb"))
        assert ("wandb" in cfg.logger) == (option == "wandb")
    if group == "model":
        assert cfg.model.name == option and cfg.model.lora.enabled is False


def test_default_config_is_dpo_on_tiny_model_and_bundled_pairs_on_cpu(tmp_path):
    cfg = compose(output_dir=tmp_path)
    assert cfg.algorithm.name == "dpo"
    assert cfg.model.name == "tiny"
    assert cfg.data.source._target_ == "alignlab.data.arith.ArithTask"
    assert cfg.trainer.accelerator == "cpu"
    assert (cfg.algorithm.beta, cfg.algorithm.rpo_alpha, cfg.algorithm.loss_type) == (0.1, 1.0, "sigmoid")


def test_algorithm_picks_its_own_data_kind_unless_overridden(tmp_path):
    assert compose(["algorithm=sft"], tmp_path).data._target_ == "alignlab.data.SFTDataModule"
    assert compose(["algorithm=dpo"], tmp_path).data._target_ == "alignlab.data.PairwiseDataModule"
    assert compose(["algorithm=sft", "data=custom_sft"], tmp_path).data.source._target_.endswith("FileSource")


PPO = ["algorithm=ppo", "algorithm.reward_model=/nowhere/rm"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm=dpo", "data=arith_sft"],
            "algorithm=dpo needs pairwise data, but data=alignlab.data.SFTDataModule",
        ),
        (["algorithm=sft", "data=arith_pairs"], "algorithm=sft needs sft data"),
        (
            ["algorithm=kto", "data=arith_pairs"],
            "provides pairwise data; pick a data config of that kind (e.g. "
            "data=arith_kto) or, to train on these preference pairs, add data.unpair=true to the command",
        ),
        (
            ["data.unpair=true"],
            "data.unpair=true splits each pair into a desirable and an undesirable row for a labelled-data algorithm "
            "(algorithm=kto); algorithm=dpo trains on pairwise data: drop data.unpair",
        ),
        (["algorithm=kto", "algorithm.undesirable_weight=-1"], "algorithm.undesirable_weight must be >= 0, got -1"),
        (["algorithm=simpo", "algorithm.simpo_gamma=-0.1"], "algorithm.simpo_gamma must be >= 0, got -0.1"),
        (["algorithm=simpo", "algorithm.beta=0"], "algorithm.beta must be > 0, got 0"),
        (["algorithm=orpo", "algorithm.beta=-1"], "algorithm.beta must be > 0"),
        (["algorithm=cpo", "algorithm.cpo_alpha=-1"], "algorithm.cpo_alpha must be >= 0"),
        (["algorithm.beta=abc"], "algorithm.beta must be a number, got 'abc'"),
        (["algorithm.beta=0"], "algorithm.beta must be > 0, got 0"),
        (["algorithm.beta=-0.5"], "algorithm.beta must be > 0"),
        (["algorithm.rpo_alpha=-1"], "algorithm.rpo_alpha must be >= 0"),
        (["algorithm.loss_type=squared"], "algorithm.loss_type: unknown DPO loss type 'squared'"),
        (["algorithm.label_smoothing=0.5"], "algorithm.label_smoothing must be in [0, 0.5)"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["optim.scheduler=exponential"], "optim.scheduler must be one of"),
        (["data=custom_pairs"], "required config value(s) not set: data.source.path"),
        (["batch_size=0"], "data.batch_size must be a whole number >= 1, got 0"),
        (["max_length=1"], "data.max_length must be a whole number >= 2, got 1"),
        (["data=custom_pairs", "data.source.path=x.jsonl", "data.on_bad_row=ignore"], "data.on_bad_row must be one of"),
        ([*PPO, "algorithm.cliprange=0"], "algorithm.cliprange must be > 0, got 0"),
        ([*PPO, "algorithm.cliprange_value=-0.2"], "algorithm.cliprange_value must be > 0, got -0.2"),
        ([*PPO, "algorithm.lam=1.5"], "algorithm.lam must be in [0, 1], got 1.5"),
        ([*PPO, "algorithm.gamma=-0.1"], "algorithm.gamma must be in [0, 1], got -0.1"),
        ([*PPO, "algorithm.vf_coef=-1"], "algorithm.vf_coef must be >= 0, got -1"),
        ([*PPO, "algorithm.kl_coef=-0.05"], "algorithm.kl_coef must be >= 0, got -0.05"),
        (PPO, "algorithm.reward_model=/nowhere/rm is not a reward-model folder"),
        (["algorithm=ppo"], "algorithm=ppo needs a reward: set algorithm.reward_model"),
        (["algorithm=grpo", "algorithm.num_generations=1"], "algorithm.num_generations must be a whole number >= 2"),
        (["algorithm=grpo", "algorithm.beta=-0.1"], "algorithm.beta must be >= 0, got -0.1"),
        (["algorithm=grpo", "algorithm.epsilon=0"], "algorithm.epsilon must be > 0, got 0"),
        (["algorithm=kto", "algorithm.beta=0"], "algorithm.beta must be > 0, got 0"),
        (
            ["algorithm=rm", "algorithm.center_rewards_coefficient=-1"],
            "algorithm.center_rewards_coefficient must be >= 0",
        ),
        (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0, got -0.1"),
        (["model.quantization=8bit"], "model.quantization must be one of (None, '4bit'), got '8bit'"),
        (["model.quantization=4bit"], "model.quantization=4bit (QLoRA) trains LoRA adapters on frozen 4-bit weights"),
        (["model.dtype=float64"], "model.dtype must be one of"),
        # what users mistype most: a key the algorithm does not have, a model folder that is not there
        (
            ["+algorithm.betta=0.2"],
            "algorithm.betta is not a setting of algorithm=dpo (did you mean beta?); its settings are beta, "
            "disable_dropout, discopop_tau, f_alpha_divergence_coef, f_divergence_type, ipo_normalize_length, "
            "label_smoothing, ld_alpha, loss_type, loss_weights, precompute_ref_log_probs, ref_model, "
            "ref_model_mixup_alpha, ref_model_sync_steps, reference_free, rpo_alpha, sync_ref_model, use_weighting",
        ),
        (["algorithm=kto", "+algorithm.rpo_alpha=1"], "algorithm.rpo_alpha is not a setting of algorithm=kto; its"),
        (["algorithm=grpo", "+algorithm.num_generation=4"], "(did you mean num_generations?)"),
        (["model.tiny=null", "model.path=/nowhere/model"], "model.path=/nowhere/model: no such folder"),
        (["model.tiny=null", "model.path=./runs/dpo/model"], "model.path=./runs/dpo/model: no such folder"),
        (["model.tiny=null", "model.path=runs/dpo/1/model"], "model.path=runs/dpo/1/model: no such folder"),
    ],
)
def test_bad_config_fails_before_any_model_loads(overrides, message, tmp_path, monkeypatch):
    import alignlab.train

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(alignlab.train, "load_model", no_model)
    with pytest.raises(ConfigError) as err:
        alignlab.train.train(compose(overrides, tmp_path / "run"))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("hardware", ["gpu", "ddp", "fsdp", "deepspeed"])
def test_a_gpu_profile_without_a_gpu_fails_before_any_model_loads(hardware, tmp_path, monkeypatch):
    import alignlab.train

    monkeypatch.setattr(alignlab.train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    real = importlib.util.find_spec  # as if DeepSpeed were installed: the machine is what is missing
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu\) needs a CUDA GPU, and torch finds none"):
        alignlab.train.train(compose([f"hardware={hardware}"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_wrong_overrides_on_the_command_line_are_clear(tmp_path):
    out = run_cli(["algorithm=nope", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'algorithm/nope'" in out.stderr and "dpo" in out.stderr and "sft" in out.stderr
    out = run_cli(["algorithm.bta=0.2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode != 0 and "algorithm.bta" in out.stderr
    out = run_cli(["algorithm=dpo", "data=arith_sft", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 1
    assert "alignlab: error: algorithm=dpo needs pairwise data, but data=arith_sft provides sft data" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["algorithm.betta=0.2"], "algorithm.betta is not a setting of algorithm=dpo (did you mean beta?); its"),
        (["+algorithm.betta=0.2"], "algorithm.betta is not a setting of algorithm=dpo (did you mean beta?); its"),
        (["algorithm=kto", "algorithm.rpo_alpha=1"], "algorithm.rpo_alpha is not a setting of algorithm=kto; its"),
        (["sweep=kto_beta", "algorithm.rpo_alpha=1"], "algorithm.rpo_alpha is not a setting of algorithm=kto; its"),
        (["-m", "algorithm=dpo,cpo", "algorithm.rpo_alpha=1"], "algorithm.rpo_alpha is not a setting of algorithm=cpo"),
        (["+lr=5e-7"], "+lr: the config has no top-level setting lr (did you mean optim.lr?)"),
        (
            ["data=custom_pairs", "data.source.path=train.jsonl#40"],
            "data.source.path=train.jsonl#40: Hydra's command line reads '#' only inside quotes; write "
            "data.source.path=train.jsonl data.source.max_rows=40 (the same sample) or "
            "'data.source.path=\"train.jsonl#40\"'",
        ),
        (
            ["-m", "hardware=slurm"],
            "hardware=slurm submits the run through SLURM, but sbatch and srun are not on this machine's PATH: "
            "launch from a SLURM login node, or train on this machine with hardware=cpu, gpu or ddp",
        ),
    ],
)
def test_mistyped_command_lines_are_refused_before_hydra_creates_the_run_folder(args, message, tmp_path, monkeypatch):
    """Hydra writes the run folder and .hydra/ before alignlab's code runs: these are caught first."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no SLURM tools here, whatever the machine
    run = tmp_path / "run"
    out = run_cli([*args, f"hydra.run.dir={run}", f"hydra.sweep.dir={run}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alignlab: error: {message}"), out.stderr
    assert not run.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["data=custom_pairs", "data.source.path=data/train.jsonl"],
            "data/train.jsonl: no such file; check data.source.path (relative paths start from {cwd})",
        ),
        (
            ["model.tiny=null", "model.path=/nowhere/model"],
            "model.path=/nowhere/model: no such folder (relative paths start from {cwd}); give a folder that holds "
            "a Hugging Face model (config.json, weights and tokenizer, e.g. a run's <run>/model) or a Hub id such "
            "as Qwen/Qwen2.5-0.5B-Instruct",
        ),
    ],
)
def test_a_missing_data_file_or_model_folder_is_one_sentence_and_the_run_folder_stays_empty(args, message, tmp_path):
    run = tmp_path / "run"
    out = run_cli([*args, f"hydra.run.dir={run}"], cwd=tmp_path, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "alignlab: error: " + message.format(cwd=tmp_path)
    assert not run.exists()  # Hydra made it for this run, which stopped before training: removed again


def test_model_qwen_offline_ends_in_one_clear_sentence(tmp_path):
    out = run_cli(["model=qwen", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("alignlab: error: Could not load model 'Qwen/Qwen2.5-0.5B-Instruct'")
    assert "model.path=/path/to/copy" in last and "Traceback" not in out.stderr
    # said before anything is written; the folder existed before the command, so it stays (with Hydra's record)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "alignlab.log"]


def test_saved_config_is_resolved_and_has_no_secrets(tmp_path):
    cfg = compose(["logger=wandb", "+logger.wandb.api_key=s3cr3t"], tmp_path)
    save_resolved_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr3t" not in text and "<redacted>" in text
    assert "${" not in text and str(tmp_path) in text
    assert redact({"a": {"hf_token": "x", "tokenizer": 1}, "max_new_tokens": 8, "b": [{"password": "p"}]}) == {
        "a": {"hf_token": "<redacted>", "tokenizer": 1},
        "max_new_tokens": 8,
        "b": [{"password": "<redacted>"}],
    }


# Keys added with `+`: refused where nothing reads them (a typo Hydra accepts), with the key meant.
NOT_READ = "and nothing reads a key added there, so the run would ignore it"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+lr=5e-7"], f"+lr: the config has no top-level setting lr (did you mean optim.lr?), {NOT_READ}"),
        (["-m", "+lr=1e-4,1e-5"], "+lr: the config has no top-level setting lr (did you mean optim.lr?)"),
        (["+seeds=3"], "+seeds: the config has no top-level setting seeds (did you mean seed?)"),
        (
            ["+trainer.max_step=20"],
            "+trainer.max_step: trainer builds lightning.pytorch.Trainer, which takes no argument max_step "
            "(did you mean trainer.max_steps?)",
        ),
        (
            ["+optim.warmup=3"],
            f"+optim.warmup: optim has no setting warmup (did you mean optim.warmup_steps?), {NOT_READ}; optim's "
            "settings are betas, lr, scheduler, warmup_steps, weight_decay",
        ),
        (["+model.tiny.hiden_size=64"], "+model.tiny.hiden_size: model.tiny has no setting hiden_size (did you mean "),
        (
            ["data=custom_pairs", "data.source.path=x.jsonl", "+data.source.max_row=40"],
            "+data.source.max_row: data.source builds alignlab.data.files.FileSource, which takes no argument "
            "max_row (did you mean data.source.max_rows?)",
        ),
        (
            ["algorithm=kto", "+data.unpaired=true"],
            "+data.unpaired: data builds alignlab.data.LabelledDataModule, which takes no argument unpaired "
            "(did you mean data.unpair?)",
        ),
        (
            ["+logger.wandb.mode=offline"],  # a builder that takes no such argument, inside an open section
            "+logger.wandb.mode: logger.wandb builds alignlab.runner.loggers.wandb_logger, which takes no "
            "argument mode",
        ),
        (
            ["+evaluation.max_new_token=4"],
            "+evaluation.max_new_token: evaluation has no setting max_new_token (did you mean "
            "evaluation.max_new_tokens?)",
        ),
    ],
)
def test_keys_added_with_plus_that_nothing_reads_are_refused(args, message):
    from alignlab.runner.preflight import preflight

    with pytest.raises(ConfigError) as error:
        preflight(args)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "args",
    [
        ["+data.on_bad_row=skip"],  # an argument of the data module the bundled config leaves at its default
        ["+trainer.fast_dev_run=true", "++trainer.max_steps=3"],  # any argument of Lightning's Trainer
        ["+logger.tsv._target_=my.Logger", "+logger.tsv.path=x"],  # a logger of one's own
        ["+callbacks.mark._target_=my.Callback", "+callbacks.mark.step=5"],  # a callback of one's own
        ["hardware=ddp", "+trainer.strategy.static_graph=true"],  # DDPStrategy passes its **kwargs to DDP
        ["+hydra.job.env_set.TOKENIZERS_PARALLELISM=false"],
        ["data=custom_pairs", "data.source.path=x.jsonl", "+data.source.max_rows=40"],
    ],
)
def test_keys_added_with_plus_that_something_reads_pass(args):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from alignlab.runner.preflight import preflight

    added = [o for o in OverridesParser.create().parse_overrides(args) if o.is_add() or o.is_force_add()]
    assert added, "each case adds a key with + (else it tests nothing)"
    preflight(args)  # raises ConfigError for a key nothing reads


@pytest.mark.parametrize(
    ("args", "given"),
    [(["model.path=outputs/sft/run/model"], "outputs/sft/run/model"), (["model=tiny_vl", "model.path=vl/model"], None)],
)
def test_a_model_path_the_tiny_model_would_replace_is_refused(args, given, tmp_path):
    """The README's chaining step without model.tiny=null would train a fresh tiny model, silently."""
    from alignlab.runner.preflight import preflight

    model = "tiny_vl" if "model=tiny_vl" in args else "tiny"
    path = args[-1].split("=", 1)[1]
    message = (
        f"model.path={path} is not the model that would train: model={model} builds the embedded tiny model "
        f"(model.tiny is set), which would train in its place; add model.tiny=null to train {path}"
    )
    for refuse in (preflight, compose):
        with pytest.raises(ConfigError) as error:
            refuse(args)
        assert str(error.value) == message
    preflight([*args, "model.tiny=null"])  # the path trains
    preflight(["model=qwen", "model.path=my/copy"])  # a config without the tiny model
    preflight(["model.path=cache/tiny", "model.tiny.hidden_size=64"])  # the tiny model, written there on purpose


def test_kto_on_a_pairs_file_with_data_unpair(tmp_path):
    """`algorithm=kto data=custom_pairs data.unpair=true`: the user's own pairs, two labelled rows each."""
    from alignlab.data.mixture import build_datamodule

    path = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    args = ["algorithm=kto", "data=custom_pairs", f"data.source.path={path}", "data.source.eval_fraction=0"]
    with pytest.raises(ConfigError, match="or, to train on these preference pairs, add data.unpair=true to the"):
        check_config(compose(args, tmp_path))
    cfg = compose([*args, "data.unpair=true"], tmp_path)
    check_config(cfg)
    assert cfg.data._target_ == "alignlab.data.LabelledDataModule"  # as config.yaml records it
    rows = build_datamodule(cfg.data).read()["train"]
    assert sorted((r["prompt"][-1]["content"], r["completion"], r["label"]) for r in rows) == [
        ("1+1=", "2", True),
        ("1+1=", "3", False),
        ("2+2=", "4", True),
        ("2+2=", "5", False),
    ]
