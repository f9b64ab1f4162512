"""The installed package carries the top-level schedules/ and tuning_logs/ folders, and the console script."""
import importlib.resources
import os
import shutil
import subprocess
import sys

import tvmconv.schedules


def test_schedules_and_tuning_logs_ship_inside_the_package():
    assert tvmconv.schedules.RULES and all(hasattr(rule, "schedule") for rule in tvmconv.schedules.RULES)
    assert (importlib.resources.files("tvmconv.tuning_logs") / "README.md").is_file()


def test_console_script_demo(tmp_path):
    script = shutil.which("tvmconv", path=os.path.dirname(sys.executable))
    assert script, "the tvmconv console script is not installed beside this Python"
    env = dict(os.environ, TVMCONV_CACHE_DIR=str(tmp_path))
    out = subprocess.run([script, "demo", "--size", "12"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    error = float(out.stdout.split("max |tvmconv - numpy float64| = ")[1].split()[0])
    assert error < 1e-4 and out.stdout.rstrip().endswith("OK")
