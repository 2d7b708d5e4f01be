"""Checks on the command line itself, before Hydra composes anything: a misspelled group
choice (``model=llama3_2_1`` or a sweep ``attention=gqa,mixsg``) becomes one line naming the
available options, with exit code 2. The options are those of the package's configs and of any
config directory the command line adds (``--config-dir``, ``hydra.searchpath``)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"


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
                raise ConfigError(group, f"unknown option {choice!r}; available: {', '.join(options)}")


def _sweep_values(value: str) -> list[str]:
    value = value.strip()
    if value.startswith(("choice(", "range(", "glob(")):
        return []  # sweep functions: Hydra checks them
    return [v.strip() for v in value.split(",") if v.strip()]
