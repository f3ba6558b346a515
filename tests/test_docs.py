"""The snippets in docs/distillers.md run as written, in order."""

import re
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
    from hf_kd import list_distillers

    assert set(list_distillers()) <= documented | {n for n in list_distillers() if n.startswith("test_")}
