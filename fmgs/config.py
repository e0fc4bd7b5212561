"""Training configuration: the shipped defaults merged with a user config and overrides.

Configs are OmegaConf YAML files. ``assets/configs/default.yaml`` holds every
key with its documented default; a user config (a path, or the name of a file in
``assets/configs``) is merged over it, then ``key=value`` overrides from the
command line (OmegaConf dot-list syntax, e.g. ``train.iterations=500``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from fmgs.assets import CONFIG_DIR
from fmgs.errors import FmgsInputError


def resolve_config_path(name_or_path: str) -> Path:
    """Map a config name (``zju377_60min``) or a path to an existing YAML file.

    Raises:
        FmgsInputError: no such file, naming where it looked.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    raise FmgsInputError(
        f"config not found (looked for this path and for {CONFIG_DIR}/{name_or_path}.yaml)", p
    )


def load_config(config: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the run configuration.

    Args:
        config: optional user config (path or shipped name) merged over the defaults.
        overrides: OmegaConf dot-list strings, applied last.

    Returns:
        The merged, resolved configuration (interpolations such as the data root
        from ``$FMGS_DATA`` are resolved once, so a saved run config is explicit).

    Raises:
        FmgsInputError: unknown config, unknown override key, or bad YAML.
    """
    base = OmegaConf.load(CONFIG_DIR / "default.yaml")
    OmegaConf.set_struct(base, True)
    try:
        if config:
            path = resolve_config_path(config)
            base = OmegaConf.merge(base, OmegaConf.load(path))
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(base)
    except FmgsInputError:
        raise
    except Exception as exc:  # omegaconf raises several types for unknown keys / bad YAML
        raise FmgsInputError(f"invalid configuration: {exc}", config) from exc
    return base


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically) so a run can be resumed or reproduced."""
    from fmgs.atomic import atomic_path

    with atomic_path(path) as tmp:
        OmegaConf.save(cfg, tmp)
