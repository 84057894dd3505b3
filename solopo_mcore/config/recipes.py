"""Recipes: YAML files (or shipped names) plus ``key.sub=value`` overrides, loaded and validated."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml

from solopo_mcore.config.sections import ConfigError, RunConfig
from solopo_mcore.config.validation import validate
from solopo_mcore.config.values import from_dict


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""Named recipes ship inside the package (``solopo_mcore/recipes/*.yaml``, package data), so a
wheel install finds them too; ``examples/recipes`` in a checkout is a link to the same folder."""


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a named recipe "
                      f"({', '.join(names)})")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a YAML recipe (a file or a recipe name; optional) and apply ``key.sub=value``
    overrides, then validate."""
    tree: dict = {}
    if path is not None:
        path = resolve_recipe(path)
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    config = from_dict(RunConfig, tree, "")
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
