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
    assert modules - listed == set(), "add new modules to a layer of .importlinter (docs/architecture.md)"


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_lint_imports_keeps_the_contracts():
    result = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:]


MAX_MODULE_LINES = 500
#: Classes that grew past what one reader holds in mind, and their ceilings.
MAX_CLASS_LINES = {("isearle/demo/engine.py", "DemoEngine"): 200, ("isearle/retrieval.py", "Retriever"): 250}


def python_files() -> list[Path]:
    return sorted(p for p in [*REPO.glob("isearle/**/*.py"), *REPO.glob("*.py"), *REPO.glob("bench/*.py")]
                  if ".venv" not in p.parts)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in python_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these modules (at most {MAX_MODULE_LINES} lines each)"


@pytest.mark.parametrize("path, name", list(MAX_CLASS_LINES))
def test_the_big_classes_stay_small(path, name):
    import ast

    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    lines = cls.end_lineno - cls.lineno + 1
    assert lines < MAX_CLASS_LINES[(path, name)], f"{name} has {lines} lines"


@pytest.mark.parametrize("script", ["app.py", "app_inspector.py"])
def test_the_app_imports_only_the_demo_package_from_the_library(script):
    """app.py and app_inspector.py sit outside the package (import-linter does not see them): they
    reach the library through `isearle.demo` alone, which asks the session for everything else."""
    import ast

    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "isearle":
                names.update(f"isearle.{a.name}" for a in node.names)
    library = {n for n in names if n == "isearle" or n.startswith("isearle.")}
    outside = {n for n in library if n != "isearle" and not (n == "isearle.demo" or n.startswith("isearle.demo."))}
    assert outside == set(), f"{script} imports {sorted(outside)}: ask isearle.demo instead"


def test_every_one_line_error_derives_from_isearle_error():
    """The app and the CLI catch `IsearleError` alone: each user-facing error type is one."""
    from isearle.artifacts import ArtifactError
    from isearle.backbone import WeightsUnavailable
    from isearle.captions import CaptionError
    from isearle.errors import BadRequest, IsearleError, NotFound
    from isearle.images import BadImage
    from isearle.index import BackboneMismatch

    for kind in (ArtifactError, WeightsUnavailable, CaptionError, BadImage, BackboneMismatch, BadRequest, NotFound):
        assert issubclass(kind, IsearleError), kind.__name__
    assert issubclass(BadImage, ValueError) and issubclass(WeightsUnavailable, RuntimeError)  # kept for old callers
    assert issubclass(NotFound, FileNotFoundError)


def test_the_cli_and_the_app_catch_isearle_error():
    cli = (REPO / "isearle" / "cli" / "__init__.py").read_text(encoding="utf-8")
    app = (REPO / "app.py").read_text(encoding="utf-8")
    assert "except IsearleError as err" in cli
    assert "EXPECTED = (IsearleError,)" in app


def test_the_index_names_no_demo_folder_or_command():
    """A damaged gallery's remedy comes from the gallery (`info["rebuild"]`) or the code that builds
    its kind (`index.REBUILD_COMMANDS`), not from the index module."""
    src = (REPO / "isearle" / "index.py").read_text(encoding="utf-8")
    assert "isearle.demo" not in src and "build-gallery" not in src
    assert re.search(r"\bgallery_index\b", src) is None  # the offline world's folder
