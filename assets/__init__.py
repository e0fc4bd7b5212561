"""Small files shipped with fmgs-avatar: default configs, palettes, shaders."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
CONFIG_DIR = ASSETS_DIR / "configs"
