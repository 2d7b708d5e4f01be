"""Checks on the command line itself, before Hydra writes anything: the config is composed here
as ``hydra.main`` will compose it, so that a misspelled group choice (``model=llama3_2_1`` or a
sweep ``attention=gqa,mixsg``), a mistyped key (``trainer.max_stepz=3``), an unknown group or a
value Hydra cannot parse each become one line with exit code 2, with a "did you mean" where one
name is close; Hydra's own message is kept in ``ConfigError.detail``. Group options are those of
the package's configs and of any config directory the command line adds (``--config-dir``,
``hydra.searchpath``)."""

from __future__ import annotations

import difflib
import importlib.resources
import re
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Hydra's command-line flags that this pre-check understands; with any other flag (--cfg, --help,
# --config-dir, ...) Hydra alone reads the command line.
RUN_FLAGS = ("-r", "--run")
MULTIRUN_FLAGS = ("-m", "--multirun")

# ``${run_id:}`` in ``hydra.run.dir``: six random hex digits, the same wherever one composed config
# (and Hydra's per-job copies of it) resolves it, so two runs started in the same second differ.
OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def config_dirs(argv: list[str]) -> list[Path]:
    """The package's config directory plus those ``argv`` adds: ``--config-dir DIR`` (``-cd``,
    ``--config-dir=DIR``) and ``hydra.searchpath=[file://DIR,pkg://module]``."""
    dirs = [CONF_DIR]
    for arg, following in zip(argv, [*argv[1:], None]):
        key, _, value = arg.partition("=")
        if key in ("--config-dir", "-cd") and (value or following):
            dirs.append(Path(value or following))
        elif key.lstrip("+") == "hydra.searchpath":
            dirs.extend(_search_path_dir(entry) for entry in value.strip("[]").split(",") if entry.strip())
    return [d for d in dirs if d is not None and d.is_dir()]


def _search_path_dir(entry: str) -> Path | None:
    entry = entry.strip().strip("'\"")
    if entry.startswith("file://"):
        return Path(entry[len("file://"):])
    if entry.startswith("pkg://"):
        try:
            return Path(str(importlib.resources.files(entry[len("pkg://"):].replace("/", "."))))
        except (ModuleNotFoundError, TypeError):
            return None
    return None


def check_group_choices(argv: list[str], conf_dirs: list[Path] | None = None) -> None:
    """Raise ConfigError for any ``group=option`` whose YAML exists in none of ``conf_dirs``
    (default: ``config_dirs(argv)``)."""
    conf_dirs = config_dirs(argv) if conf_dirs is None else conf_dirs
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra.", "hydra/")):
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        folders = [d / group for d in conf_dirs if (d / group).is_dir()]
        if "." in group or not folders:
            continue
        options = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
        for choice in _sweep_values(value):
            if choice not in options and choice != "null":
                hint = _did_you_mean(choice, options)
                raise ConfigError(group, f"unknown option {choice!r}; available: {', '.join(options)}{hint}")


def _sweep_values(value: str) -> list[str]:
    value = value.strip()
    if value.startswith(("choice(", "range(", "glob(")):
        return []  # sweep functions: Hydra checks them
    return [v.strip() for v in value.split(",") if v.strip()]


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def is_multirun(argv: list[str]) -> bool:
    return any(arg in MULTIRUN_FLAGS or (arg.startswith("hydra.mode=") and "MULTIRUN" in arg) for arg in argv)


def composable(argv: list[str]) -> bool:
    """True when this module can compose the command line ahead of Hydra: no Hydra flags besides
    ``--run`` and ``--multirun`` (``--cfg``, ``--help``, ``--config-dir``, ... go to Hydra alone)."""
    return not any(arg.startswith("-") and arg not in RUN_FLAGS + MULTIRUN_FLAGS for arg in argv)


def first_of_sweeps(argv: list[str]) -> list[str]:
    """The overrides of a multirun's first job (each sweep ``key=a,b`` / ``range`` / ``choice``
    replaced by its first value): composing it finds a mistyped key before the sweep starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [arg for arg in argv if not arg.startswith("-")]
    check_override_syntax(overrides)
    first = []
    for arg, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not override.is_sweep_override():
            first.append(arg)
            continue
        try:
            first.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
        except (HydraException, StopIteration):
            continue  # glob() and other sweeps that need the config: Hydra expands them itself
    return first


def compose(argv: list[str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """The config ``hydra.main`` will compose from ``argv`` (``hydra`` node included, with
    ``HydraConfig`` set so that ``hydra.run.dir`` resolves); Hydra's errors become one-line
    ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException, OverrideParseException

    overrides = [arg for arg in argv if arg not in RUN_FLAGS + MULTIRUN_FLAGS]
    check_override_syntax(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except OverrideParseException as err:
        raise _with_detail(ConfigError("command line", f"{_first_line(err)}; check the quoting"), err) from None
    except HydraException as err:
        raise _with_detail(_composition_error(err, conf_dir), err) from None
    HydraConfig.instance().set_config(cfg)
    return cfg


def job_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the ``hydra`` node: what the task function receives."""
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return job


def check_override_syntax(overrides: list[str]) -> None:
    """ConfigError naming the first override Hydra's grammar cannot parse (e.g. ``attention.ratio=[1,2``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as err:
            key = arg.split("=", 1)[0].lstrip("+~") or "command line"
            raise _with_detail(ConfigError(
                key, f"cannot parse {arg!r} ({_first_line(err)}); close brackets and quotes, and quote values with "
                     "spaces or special characters, e.g. 'key=\"a b\"'"), err) from None


def _composition_error(err: Exception, conf_dir: Path) -> ConfigError:
    message = str(err)
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown and _in_schema(unknown.group(1)):
        key = unknown.group(1)
        return ConfigError(key, f"a setting the shipped YAML leaves at its default; set it with +{key}=...")
    if unknown:
        key = unknown.group(1)
        hint = _did_you_mean(key, _known_keys(conf_dir))
        return ConfigError(key, f"no such key or config group{hint or '; check the spelling'} "
                                f"(to add a new key on purpose, write +{key}=...)")
    missing = re.search(r"Could not find '([^']+)'", message)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        folder = conf_dir / group
        options = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        available = f"; available: {', '.join(options)}{_did_you_mean(option, options)}" if options else ""
        return ConfigError(group or "config", f"unknown option {option!r}{available}")
    if message.startswith("Ambiguous value"):
        return ConfigError("config", f"{_first_line(err)}; a comma-separated value is a sweep: add --multirun (-m)")
    return ConfigError("config", _first_line(err))


def _in_schema(key: str) -> bool:
    """True when ``key`` is a field of the typed run config (``RunConfig``), present in YAML or not."""
    from .config import RunConfig

    return OmegaConf.select(OmegaConf.structured(RunConfig), key, default="__absent__") != "__absent__"


def _known_keys(conf_dir: Path) -> list[str]:
    """Every dotted key of the default config and every config group name: the did-you-mean candidates."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = hydra_compose(config_name="config")
    keys = [p.name for p in conf_dir.iterdir() if p.is_dir()]
    _collect(OmegaConf.to_container(cfg), "", keys)
    return keys


def _collect(tree, prefix: str, out: list[str]) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.append(name)
            _collect(value, name, out)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _with_detail(error: ConfigError, cause: Exception) -> ConfigError:
    error.detail = f"{type(cause).__name__}: {cause}"
    return error
