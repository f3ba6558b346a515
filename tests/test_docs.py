"""The snippets in docs/distillers.md run as written, in order."""

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "distillers.md"


def test_every_distiller_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 11
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block.replace("/tmp/hf_kd_docs", str(tmp_path)), f"{DOCS.name}[{index}]", "exec"), namespace)
    documented = set(re.findall(r'"name": "(\w+)"', DOCS.read_text()))
    # what `import hf_kd` registers (a fresh interpreter: tests register distillers of their own)
    names = subprocess.run([sys.executable, "-c", "import hf_kd; print(' '.join(hf_kd.list_distillers()))"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(names) >= 18 and set(names) <= documented, sorted(set(names) - documented)
