"""What every command shares: `UsageError` (one line, exit code 2), model kwargs and PruneConfigs
given on the command line, and timm models built from them."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import ConfigError, PruneConfig


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit code 2."""


def parse_model_kwargs(text: str | None, flag: str = "--model-kwargs") -> dict:
    """'img_size=64,patch_size=8,qk_norm=true' -> {'img_size': 64, 'patch_size': 8, 'qk_norm': True}."""
    kwargs = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag}: {item!r} is not KEY=VALUE (e.g. img_size=64,patch_size=8)")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def load_configs(specs: list[str]) -> dict[str, PruneConfig]:
    """Named configs from inline JSON objects or YAML/JSON files (one config, or name -> config)."""
    configs: dict[str, PruneConfig] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            data, origin = parse_yaml(spec, "inline --config"), None
        else:
            path = Path(spec)
            if not path.is_file():
                raise UsageError(f"--config: {spec!r} is neither a file nor an inline JSON object")
            data, origin = parse_yaml(path.read_text(), spec), spec
        entries = {None: data} if isinstance(data, dict) and "reducer" in data else data
        if not isinstance(entries, dict):
            raise UsageError(f"--config {origin or spec!r}: expected a config or a mapping name -> config")
        for name, entry in entries.items():
            try:
                cfg = PruneConfig.from_dict(entry)
            except ConfigError as error:
                where = f"{origin}: {name}: " if origin and name else f"{origin}: " if origin else ""
                raise UsageError(f"--config {where}{error}") from None
            configs[str(name) if name is not None else cfg.describe()] = cfg
    return configs


def parse_yaml(text: str, origin: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"--config {origin}: not valid YAML/JSON ({str(error).splitlines()[0]})") from None


def create_model(name: str, kwargs: dict):
    from ..trial import ModelError, create_unweighted

    try:
        return create_unweighted(name, kwargs)
    except ModelError as error:
        raise UsageError(str(error)) from None
