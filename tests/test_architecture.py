"""The house rules: the README's "Use from Python" example runs, and every module sits in a layer of
the import-linter contract (.importlinter), which `lint-imports` checks."""

import configparser
import contextlib
import io
import os
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import isearle

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one Python example"
    return blocks[0]


def test_readme_use_from_python_runs_and_agrees_with_the_service(monkeypatch):
    if not (REPO / "gallery_index" / "index.json").is_file():
        pytest.skip("no offline gallery in this checkout")
    monkeypatch.chdir(REPO)
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(readme_example(), "README.md", "exec"), scope)
    hits, q, backbone = scope["hits"], scope["q"], scope["backbone"]
    assert len(hits) == 5 and q["reference_img_id"] not in [h.id for h in hits]
    assert scope["token"].shape == scope["token_oti"].shape == (backbone.token_width,)
    assert float(scope["query"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert len(out.getvalue().splitlines()) == 5
    # the API and the query path of the CLI and the demo give the same ranking
    service = isearle.load_service(REPO / "gallery_index", device="cpu")
    same = service.retriever.query(scope["image"], q["relative_caption"], 5, "phi", exclude=[q["reference_img_id"]])
    assert [h.id for h in hits] == [h.id for h in same]
    assert [h.score for h in hits] == pytest.approx([h.score for h in same], abs=1e-5)


def contract_layers() -> list[str]:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"]
    return [m.strip() for line in layers.strip().splitlines() for m in line.split("|")]


def test_every_module_sits_in_a_layer():
    listed = set(contract_layers())
    modules = {f"isearle.{m.name}" for m in pkgutil.iter_modules(isearle.__path__)}
    assert modules - listed == set(), "add new modules to a layer of .importlinter (README: Architecture)"


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_lint_imports_keeps_the_contracts():
    result = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:]
