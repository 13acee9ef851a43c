"""House rule: the core (everything outside dinomaly/distributed) works with Ray unavailable."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dinomaly"
CORE_MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py")
    if "distributed" not in p.parts
)

PROBE = """
import importlib, sys, traceback
sys.modules["ray"] = None  # any `import ray` now raises ImportError
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_core_imports_without_ray():
    assert "dinomaly.config" in CORE_MODULES
    result = subprocess.run([sys.executable, "-c", PROBE, *CORE_MODULES], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_probe_catches_a_ray_import(tmp_path):
    """The probe itself must fail on a module that imports Ray (else the test above proves nothing)."""
    (tmp_path / "uses_ray.py").write_text("import ray\n")
    result = subprocess.run([sys.executable, "-c", PROBE, "uses_ray"], capture_output=True, text=True,
                            cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert result.returncode == 1 and "uses_ray" in result.stdout
