"""Checks on the command line that must run before Hydra starts a job.

Hydra creates the run folder and writes `.hydra/` before alignlab's code runs, so a mistake that
Hydra itself would report with a traceback (an algorithm key that does not exist), one that would
otherwise rewrite another run's `.hydra/` (a second launch into its folder) or one that only a
launcher plugin would find (no SLURM) is caught here, from the overrides alone. Light imports only:
this runs before Lightning is imported, so a mistyped override is reported at once. The exceptions: a
key added with `+` is checked on the composed config, and one under a section that builds an object
(`+trainer.…`, `+data.…`) against that object's arguments, which imports its class.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignlab.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/, beside the package
# The checkpoint a run folder holds once it has trained (the same file as alignlab.runner.resume.LAST,
# which imports Lightning): a folder with one already holds a run.
RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Keys of conf/algorithm/<name>.yaml that hold algorithm metadata rather than hyper-parameters.
ALGORITHM_META_KEYS = ("name", "data_kinds", "requires_chat_template")
# Flags under which Hydra only prints (help, the config): no job runs, no folder is written.
_PRINT_ONLY = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean beta?)' for the valid name closest to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# The keys of multi-turn rollouts (alignlab.algorithms.multiturn): an algorithm without them refuses them by name.
MULTI_TURN_KEYS = ("tools", "tool_call_format", "tool_timeout", "environment", "max_turns")


def unknown_key_error(group: str, choice: str, key: str, settings: Sequence[str]) -> ConfigError:
    """The error for `group.key`, which `group=choice` does not have among its `settings`."""
    if group == "algorithm" and key in MULTI_TURN_KEYS:
        return ConfigError(
            f"algorithm.{key}: multi-turn, tool-calling rollouts are GRPO's (algorithm=grpo; docs/tools.md); "
            f"algorithm={choice} samples one answer per prompt"
            + (" and refuses them: its value targets over tool tokens are not handled" if choice == "ppo" else "")
        )
    return ConfigError(
        f"{group}.{key} is not a setting of {group}={choice}{did_you_mean(key, settings)}; "
        f"its settings are {', '.join(sorted(settings))}"
    )


def _included(path: Path, entry) -> Path | None:
    """The file a `defaults:` entry of `path` includes into `path`'s own package (`- /_partials/x@_here_`),
    or None for any other entry (`_self_`, a group override, an include into another package)."""
    if not isinstance(entry, str) or not entry.endswith("@_here_"):
        return None
    name = entry.removesuffix("@_here_")
    return (CONFIG_DIR / name.lstrip("/") if name.startswith("/") else path.parent / name).with_suffix(".yaml")


def option_files(group: str, name: str) -> list[Path]:
    """conf/<group>/<name>.yaml and the partials (conf/_partials/) its `defaults:` list includes under its
    own package, at any depth, in the order Hydra merges them: where its keys and their comments are written."""

    def walk(path: Path) -> list[Path]:
        entries = list(OmegaConf.load(path).get("defaults") or [])
        if "_self_" not in entries:
            entries.append("_self_")  # Hydra's default place for it: the file's own keys win
        files = []
        for entry in entries:
            include = _included(path, entry)
            files += [path] if entry == "_self_" else walk(include) if include is not None else []
        return files

    return walk(CONFIG_DIR / group / f"{name}.yaml")


def load_option(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml as Hydra composes it under its own package (`algorithm`, `data`): the file
    merged with the partials its `defaults:` list includes at `@_here_`, in the list's order around
    `_self_`, `defaults` left out, interpolations unresolved. Group overrides (`override /data@...`) and
    includes into another package (`@_global_`) are Hydra's to apply and are left out here. Every reader
    of an option's keys (preflight, the generated docs, run names, the modules' hparam_names) uses this.

    Raises:
        ConfigError: a partial merged after `_self_` sets a key the file sets too (the partial would win
            without a word; list it before `_self_` so the file can change it).
    """
    out, own = OmegaConf.create(), None
    for path in option_files(group, name):
        cfg = OmegaConf.load(path)
        cfg.pop("defaults", None)
        if path.parent == CONFIG_DIR / group and path.stem == name:
            own = cfg
        elif own is not None and (twice := sorted(set(cfg) & set(own))):
            raise ConfigError(
                f"conf/{group}/{name}.yaml sets {twice}, which {path.relative_to(CONFIG_DIR.parent)} (included after "
                "_self_) sets too and would win; include it before _self_ or drop the keys from one of them"
            )
        out = OmegaConf.merge(out, cfg)
    return out


def algorithm_hparams(name: str) -> list[str]:
    """The hyper-parameter keys of conf/algorithm/<name>.yaml and the partials it includes (load_option):
    the one place an algorithm's hyper-parameters are named (with their defaults and comments). The
    module class takes exactly these (AlignmentModule.hparam_names), and config checks refuse any other key."""
    return [k for k in load_option("algorithm", name) if k not in ("_target_", *ALGORITHM_META_KEYS)]


@functools.cache
def algorithm_targets() -> dict[str, str]:
    """{class path in `_target_`: algorithm name} over conf/algorithm/*.yaml, which lets a module class
    find its own config file. Raises ConfigError when two files name the same class."""
    found: dict[str, str] = {}
    for path in sorted((CONFIG_DIR / "algorithm").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target in found:
            raise ConfigError(f"conf/algorithm/{found[target]}.yaml and {path.name} both build {target}")
        found[target] = path.stem
    return found


def _values(override) -> list:
    """The value(s) an override sets: one, or each value of a sweep (`a=x,y`)."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.value()]


def _sweep_algorithms(sweep: str) -> list[str]:
    """Algorithms a shipped sweep (conf/sweep/<sweep>.yaml) selects, or [] when it selects none."""
    path = CONFIG_DIR / "sweep" / f"{sweep}.yaml"
    if not path.is_file():
        return []
    cfg = OmegaConf.load(path)
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            for key, value in entry.items():
                if key.endswith("/algorithm"):
                    return [str(value)]
    params = OmegaConf.select(cfg, "hydra.sweeper.params.algorithm")
    return [s.strip() for s in str(params).split(",")] if params else []


def chosen_algorithms(overrides: dict) -> list[str]:
    """The algorithm(s) the command line runs: `algorithm=`, else the sweep's, else conf/train.yaml's."""
    if "algorithm" in overrides:
        return [str(v) for v in _values(overrides["algorithm"])]
    if "sweep" in overrides:
        found = [a for s in _values(overrides["sweep"]) if s for a in _sweep_algorithms(str(s))]
        if found:
            return found
    default = _default_choice("algorithm")
    return [default] if default else []


def _default_choice(group: str) -> str | None:
    """conf/train.yaml's option for `group` (e.g. `tiny` for model), or None."""
    for entry in OmegaConf.load(CONFIG_DIR / "train.yaml").defaults:
        if OmegaConf.is_dict(entry) and group in entry:
            return str(entry[group])
    return None


def check_model_path(overrides: dict) -> None:
    """`model.path=<run>/model` given while the model config builds the embedded tiny model
    (`model.tiny` set, as model=tiny and tiny_vl do): the tiny model would be written beside that path
    and train in its place. Refused unless `model.tiny` is on the command line too (null: train the
    path; its keys: the embedded model, written to `<path>-<hash>` on purpose)."""
    path = overrides.get("model.path")
    if path is None or path.is_delete() or any(k == "model.tiny" or k.startswith("model.tiny.") for k in overrides):
        return
    models = [str(v) for v in _values(overrides["model"])] if "model" in overrides else [_default_choice("model")]
    for model in models:
        file = CONFIG_DIR / "model" / f"{model}.yaml"
        if file.is_file() and OmegaConf.load(file).get("tiny"):
            given = ",".join(str(v) for v in _values(path))
            raise ConfigError(
                f"model.path={given} is not the model that would train: model={model} builds the embedded tiny "
                f"model (model.tiny is set), which would train in its place; add model.tiny=null to train "
                f"{given}"
            )


def check_algorithm_overrides(overrides: dict) -> None:
    """`algorithm.KEY=...` or `+algorithm.KEY=...` with a KEY the chosen algorithm does not have."""
    for name in chosen_algorithms(overrides):
        if not (CONFIG_DIR / "algorithm" / f"{name}.yaml").is_file():
            return  # Hydra lists the algorithms there are
        hparams = algorithm_hparams(name)
        for key, override in overrides.items():
            if key.startswith("algorithm.") and not override.is_delete():
                top = key.split(".")[1]
                if top not in (*hparams, *ALGORITHM_META_KEYS):
                    raise unknown_key_error("algorithm", name, top, hparams)


def check_slurm(overrides: dict) -> None:
    """hardware=slurm submits jobs with SLURM's tools: say so at once where they are missing."""
    hardware = overrides.get("hardware")
    if hardware is None or "slurm" not in [str(v) for v in _values(hardware)]:
        return
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"hardware=slurm submits the run through SLURM, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on this machine's PATH: launch from a SLURM login node, "
            "or train on this machine with hardware=cpu, gpu or ddp"
        )


def check_run_folder(overrides: dict) -> None:
    """A second launch into a folder that already holds a run (hydra.run.dir=... without resume):
    refused here, before Hydra rewrites that run's `.hydra/`. resume=auto (or a checkpoint path)
    continues the run instead, as alignlab.runner.resume.resume_checkpoint describes."""
    run_dir = overrides.get("hydra.run.dir")
    if run_dir is None or run_dir.is_sweep_override():
        return
    value = str(run_dir.value())
    resume = overrides["resume"].value() if "resume" in overrides else None
    if "${" in value or resume not in (None, ""):
        return  # an interpolation is Hydra's to resolve; train() checks the folder again
    folder = Path(value).expanduser()
    if (folder / RUN_CHECKPOINT).is_file():
        raise ConfigError(
            f"the run folder {folder} already holds a run ({RUN_CHECKPOINT}); continue it with resume=auto, "
            "or choose another hydra.run.dir"
        )


# Where a key added with `+` is passed on to code that takes any key: Hydra's own settings, a logger's
# or callback's keyword arguments (or a whole new callback), and the free-form maps of data.
OPEN_SECTIONS = ("hydra", "logger", "callbacks", "data.columns", "data.sources")


def accepted_arguments(target: str) -> set[str] | None:
    """The keyword arguments the class or function `_target_` names takes; None when it takes any key
    (`**kwargs`) or cannot be imported (instantiating it will say why). alignlab's own classes hand
    their `**kwargs` to their base class, so there the base's arguments are followed instead."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:
        return None
    chain = [c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__] if inspect.isclass(obj) else [obj]
    names: set[str] = set()
    for function in chain:
        if function is object.__init__:
            return names
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
        if not function.__module__.startswith("alignlab."):
            return None  # e.g. DDPStrategy's **kwargs go to torch's DistributedDataParallel
    return None


def _leaves(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key under `cfg` whose value is not a mapping (hydra's own left out)."""
    out = []
    for key in cfg:
        path = f"{prefix}{key}"
        if path == "hydra" or key == "_target_":
            continue
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node) and not node._is_none():
            out += _leaves(cfg[key], path + ".")
        else:
            out.append(path)
    return out


def unread_key_error(cfg: DictConfig, key: str) -> ConfigError | None:
    """The error for `+key=...` on the composed config `cfg` (without that key) when nothing reads
    `key`, or None when something does (or the key is Hydra's to judge).

    A key is read where its nearest existing section is open (OPEN_SECTIONS) or builds a `_target_`
    that takes it as an argument (every argument of the Lightning Trainer, of a data module, ...);
    a section without `_target_` (the root, model, optim, evaluation, paths) takes the keys it has.
    """
    parts = key.split(".")
    node, depth = cfg, 0
    while depth < len(parts) - 1 and OmegaConf.is_dict(node) and parts[depth] in node:
        child = node._get_node(parts[depth])
        if not OmegaConf.is_dict(child) or child._is_none():
            return None  # adding under a value that is not a mapping: Hydra says what is wrong
        node, depth = node[parts[depth]], depth + 1
    section, name = ".".join(parts[:depth]), parts[depth]
    target = node.get("_target_")
    # An open section takes new entries (a logger, a callback, a column), but an entry that builds an
    # object (logger.wandb) takes only its object's arguments.
    if name in node.keys() or (
        target is None and any(section == s or section.startswith(s + ".") for s in OPEN_SECTIONS)
    ):
        return None
    settings = [k for k in node if k != "_target_"]
    if target is not None:
        accepted = accepted_arguments(str(target))
        if accepted is None or name in accepted:
            return None
        settings = sorted(set(settings) | accepted)
    # A name that is a setting elsewhere (`+lr` for optim.lr) points there; else the closest sibling.
    elsewhere = [leaf for leaf in _leaves(cfg) if leaf.rsplit(".", 1)[-1] == name]
    close = difflib.get_close_matches(name, settings, n=1, cutoff=0.6)
    prefix = f"{section}." if section else ""
    hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else f" (did you mean {prefix}{close[0]}?)" if close else ""
    if target is not None:
        return ConfigError(f"+{key}: {section} builds {target}, which takes no argument {name}{hint}")
    where = f"{section} has no setting {name}" if section else f"the config has no top-level setting {name}"
    listed = f"; {section}'s settings are {', '.join(sorted(settings))}" if section else ""
    return ConfigError(
        f"+{key}: {where}{hint}, and nothing reads a key added there, so the run would ignore it{listed}"
    )


def check_added_keys(args: Sequence[str], parsed: Sequence) -> None:
    """`+key=value` (or `++key=value`) where nothing reads `key`: a typo (`+lr` for optim.lr,
    `+trainer.max_step`) that Hydra accepts and the run would ignore. Hydra's own message for a key
    that does not exist tells users to add `+`, so this is the path typos take. Composes the config
    (a quarter of a second) only when such a key is given; algorithm keys are check_algorithm_overrides'."""
    added = [
        (a, o)
        for a, o in zip(args, parsed)
        if (o.is_add() or o.is_force_add())
        and not (CONFIG_DIR / o.key_or_group.replace(".", "/")).is_dir()  # `+group=option`: Hydra's
        and not o.key_or_group.startswith(("hydra.", "algorithm."))
        and o.package is None
    ]
    if not added:
        return
    from hydra import compose, initialize_config_dir

    base = []
    for a, o in zip(args, parsed):
        if any(o is other for _, other in added):
            continue
        if o.is_sweep_override():  # the first of a sweep's values: its config's keys are the same
            a = f"{a.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}"
        base.append(a)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=base)
    except Exception:
        return  # Hydra says what is wrong with the line when it composes it
    for _, override in added:
        error = unread_key_error(cfg, override.key_or_group)
        if error is not None:
            raise error


def quoting_error(argv: Sequence[str]) -> ConfigError | None:
    """Hydra's override lexer stops at `#` unquoted (`data.source.path=train.jsonl#40`, ms-swift's
    sample spelling): the error with the spellings that work, or None for any other unparsable line."""
    for arg in argv:
        if "=" not in arg or "#" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        if value.startswith(("'", '"')):
            continue
        if value.startswith(("[", "{")):  # a list or map (data.sources): quote the path inside it
            return ConfigError(
                f"{arg}: Hydra's command line reads '#' only inside quotes; quote each path that carries it, "
                f"e.g. '{key}=[{{path: \"train.jsonl#40\", weight: 2}}]', or give the spec max_rows: 40 instead"
            )
        quoted = f"'{key}=\"{value}\"'"
        path, _, count = value.rpartition("#")
        same = ""
        if key.endswith(".path") and count.isdigit():
            same = f"{key}={path} {key.rsplit('.', 1)[0]}.max_rows={count} (the same sample) or "
        return ConfigError(
            f"{arg}: Hydra's command line reads '#' only inside quotes; write {same}{quoted} (quoted as shown, "
            "for the shell and for Hydra)"
        )
    return None


def preflight(argv: Sequence[str]) -> None:
    """Run every check above on a command line (`sys.argv[1:]`); raise ConfigError on the first
    failure. A line Hydra cannot parse is left to Hydra, which says what is wrong with it, except an
    unquoted `#` (quoting_error), whose spellings that work Hydra's message does not give."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=", 1)[0] in _PRINT_ONLY for a in argv):
        return
    args = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        error = quoting_error(args)
        if error is not None:
            raise error from None
        return
    overrides = {o.key_or_group: o for o in parsed}
    check_algorithm_overrides(overrides)
    check_model_path(overrides)
    check_added_keys(args, parsed)
    check_slurm(overrides)
    # A multirun (-m, or a shipped sweep, which sets hydra.mode) writes into hydra.sweep.dir instead.
    sweep = overrides.get("sweep")
    multirun = (
        any(a in ("-m", "--multirun") for a in argv)
        or (sweep is not None and sweep.value() is not None)
        or "hydra.mode" in overrides
    )
    if not multirun:
        check_run_folder(overrides)
