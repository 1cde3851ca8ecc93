"""The README's library example runs as written (outside the repo's entry points)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lily_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Lily in your own script\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["789504"]
    assert (tmp_path / "lily.pt").exists()


def test_every_method_config_is_in_the_readme():
    """A method config nobody can find is a method nobody runs: each is named in the README."""
    readme = (ROOT / "README.md").read_text()
    missing = [p.stem for p in sorted((ROOT / "configs" / "method").glob("*.yaml")) if f"`{p.stem}`" not in readme]
    assert not missing, f"configs/method without a README mention: {missing}"
