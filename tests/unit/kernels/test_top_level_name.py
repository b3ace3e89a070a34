"""Run from a checkout's root, the ``kernels/`` folder hands the top-level name ``kernels`` to an installed package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_folder_hands_the_name_kernels_to_an_installed_package_of_that_name(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'installed'\nfrom .sub import VALUE\n")
    (site / "kernels" / "sub.py").write_text("VALUE = 7\n")
    code = "import kernels; print(kernels.CUDAProperties, kernels.VALUE)"  # no transformers: it imports `kernels`
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", "7"]


def test_without_an_installed_package_the_folder_keeps_the_name(tmp_path):
    from lightning_rl.kernels._shadowing import installed_package_for_top_level_name

    folder = tmp_path / "lightning_rl_no_such_package"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        assert installed_package_for_top_level_name(folder.name, folder) is None
        assert folder.name not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
