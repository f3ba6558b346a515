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
    # what `import hf_kd` registers (a fresh interpreter: tests register distillers of their own), run from this
    # source tree so that it imports this tree's package, not another checkout that is installed
    names = subprocess.run([sys.executable, "-c", "import hf_kd; print(' '.join(hf_kd.list_distillers()))"],
                           capture_output=True, text=True, check=True, cwd=DOCS.parents[1]).stdout.split()
    assert len(names) >= 18 and set(names) <= documented, sorted(set(names) - documented)


README = DOCS.parents[1] / "README.md"
# One taxonomy: Distiller.family names the section of docs/distillers.md and the README table of every method.
DOC_SECTIONS = {"logit": "Logit distillers", "representation": "Internal representations", "relation": "Relations",
                "composite": "Composing distillers", "online": "Online modules"}
README_SECTIONS = {"logit": "Logit distillers", "representation": "Internal-representation distillers",
                   "relation": "Relation distillers", "composite": "Composing distillers",
                   "online": "Online-module distillers"}


def section(text: str, heading: str, level: str) -> str:
    start = text.index(f"\n{level} {heading}\n")
    end = text.find(f"\n{level} ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def built_in_families() -> dict[str, str]:
    from hf_kd.distillers.base import _REGISTRY, FAMILIES

    assert set(DOC_SECTIONS) == set(README_SECTIONS) == set(FAMILIES)
    return {name: cls.family for name, cls in _REGISTRY.items() if cls.__module__.startswith("hf_kd.")}


def test_docs_place_every_distiller_in_the_section_of_its_family():
    text = DOCS.read_text()
    misplaced = [name for name, family in built_in_families().items()
                 if f'"name": "{name}"' not in section(text, DOC_SECTIONS[family], "##")]
    assert misplaced == []


def test_readme_tables_place_every_distiller_under_its_family():
    text = README.read_text()
    misplaced = []
    for name, family in built_in_families().items():
        rows = [line for line in section(text, README_SECTIONS[family], "###").splitlines() if line.startswith("| ")]
        if not any(f"`{name}`" in row.split("|")[1] for row in rows):
            misplaced.append(name)
    assert misplaced == []
