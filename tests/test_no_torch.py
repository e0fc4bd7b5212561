"""`fmgs/` and `runtime/` must never import torch (DEVELOPERS.md, architecture)."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO_ROOT

TORCH_FREE_DIRS = {"fmgs": REPO_ROOT / "fmgs", "fmgs.runtime": REPO_ROOT / "runtime"}
FORBIDDEN = ("torch", "smplx", "tinycudann", "gsplat")


def _modules():
    for pkg, folder in TORCH_FREE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path


def test_no_torch_import_statements():
    """Static check: no module in the torch-free packages names torch in an import."""
    offenders = []
    for _, path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path}:{node.lineno} imports {n}")
    assert not offenders, "\n".join(offenders)


def test_importing_torch_free_packages_loads_no_torch():
    """Dynamic check: importing every torch-free module in a fresh interpreter leaves torch unloaded."""
    mods = [m for m, _ in _modules()]
    assert len(mods) >= 3, mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = [m for m in {list(FORBIDDEN)!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"torch-free packages pulled in: {out.stdout.strip()}"
