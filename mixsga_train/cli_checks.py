"""Checks on the command line itself, before Hydra composes anything: a misspelled group
choice (``model=llama3_2_1`` or a sweep ``attention=gqa,mixsg``) becomes one line naming the
available options, with exit code 2."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ConfigError for any ``group=option`` whose YAML does not exist under ``conf_dir``."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra.", "hydra/")):
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        folder = conf_dir / group
        if "." in group or not folder.is_dir():
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        for choice in _sweep_values(value):
            if choice not in options and choice != "null":
                raise ConfigError(group, f"unknown option {choice!r}; available: {', '.join(options)}")


def _sweep_values(value: str) -> list[str]:
    value = value.strip()
    if value.startswith(("choice(", "range(", "glob(")):
        return []  # sweep functions: Hydra checks them
    return [v.strip() for v in value.split(",") if v.strip()]
