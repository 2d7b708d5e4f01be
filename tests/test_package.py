"""The installed command's cheap paths: `--help` and config composition import neither torch's
training stack nor DeepSpeed."""

import subprocess
import sys

from cli import REPO


def test_help_imports_no_deepspeed_and_no_pipeline():
    code = ("import sys\nfrom mixsga_train import train\nsys.argv = ['mixsga-train', '--help']\n"
            "try:\n    train.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('deepspeed', 'mixsga_train.pipeline', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mixsga-train is powered by Hydra" in out.stdout or "== Config ==" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
