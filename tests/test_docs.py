"""The documentation stays true: every Python block of the README and of docs/ runs, every command
line shown parses with the parser of the command it names, every docs page is linked and built,
and the tables generated from the code (settings, layers, modules) match the code."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import os
import pkgutil
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import yaml

import isearle

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: written by `python bench/run_all.py --markdown`, included by docs/performance.md
RESULTS = DOCS / "performance-results.md"
PAGES = sorted(p for p in DOCS.glob("*.md") if p != RESULTS)
MARKDOWN = [REPO / "README.md", *PAGES]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced(path: Path, lang: str) -> list[str]:
    """The ```lang blocks of a Markdown file."""
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


# ---------------------------------------------------------------- Python blocks run


PYTHON_BLOCKS = [(rel(p), i, code) for p in MARKDOWN for i, code in enumerate(fenced(p, "python"))]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The demo on the offline world, started once for the blocks that talk to a server."""
    from isearle.testing import AppProcess

    tmp = tmp_path_factory.mktemp("docs-app")
    env = {"ISEARLE_CACHE": str(tmp / "cache"), "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    with AppProcess(["--no-warmup"], env, log=tmp / "app.log") as app:
        yield app.url


def test_there_are_python_blocks_to_run():
    assert any(path == "README.md" for path, _, _ in PYTHON_BLOCKS)


@pytest.mark.parametrize("path,index,code", PYTHON_BLOCKS, ids=[f"{p}#{i}" for p, i, _ in PYTHON_BLOCKS])
def test_python_block_runs(path, index, code, request, monkeypatch, tmp_path):
    """Each block runs as written, from the repository root; a block that talks to a local server
    (`http://127.0.0.1:7860/`) gets a running demo and a reference image `ref.png` beside it."""
    if not (REPO / "gallery_index" / "index.json").is_file():
        pytest.skip("no offline gallery in this checkout")
    monkeypatch.chdir(REPO)
    if "127.0.0.1:7860" in code:
        from isearle import demo as D
        from isearle.shapes.benchmark import load_benchmark

        code = code.replace("http://127.0.0.1:7860/", request.getfixturevalue("app_url"))
        queries, gallery = load_benchmark(split="val")
        D.render_spec(gallery[queries[0]["reference_img_id"]].to_dict(), D.REFERENCE_SIZE).save(tmp_path / "ref.png")
        monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": f"{path}#{index}"}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, f"{path} (python block {index})", "exec"), scope)
    assert out.getvalue().strip(), "a documented example shows its result"


# ---------------------------------------------------------------- command lines parse


PLACEHOLDERS = {"N": "2", "K": "10"}  # numbers written as letters in the docs


def split_commands(line: str) -> list[list[str]]:
    """The words of each command of a shell line (commands split at `&&`, `;`, `|`; comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", ";", "|", "||", "&"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def commands_of(path: Path) -> list[tuple[list[str], bool]]:
    """The command lines of a page, each with whether it is complete: each line of its ```bash blocks
    (complete; continuations joined, shell variables set in the block expanded) and each inline
    `isearle ...` / `python ...` with a flag (a fragment in prose: it names some flags only)."""
    found = []
    for block in fenced(path, "bash"):
        variables: dict[str, str] = {}

        def expand(m: re.Match, variables: dict[str, str] = variables) -> str:
            return variables.get(m.group(1), m.group(0))

        for line in block.replace("\\\n", " ").splitlines():
            for words in split_commands(re.sub(r"\$(\w+)", expand, line)):
                if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    name, value = words[0].split("=", 1)
                    variables[name] = value
                else:
                    found.append((words, True))
    text = path.read_text(encoding="utf-8")
    for span in re.findall(r"`((?:isearle|python) [^`]*--[^`]*)`", text):
        if "..." not in span and not re.fullmatch(r"[A-Z]{4,}", span.split()[1]):
            found += [(words, False) for words in split_commands(span)]
    return found


def entry_point(words: list[str]):
    """(a function that runs the command's `main` with `sys.argv` set, its arguments) or None when
    the command is not one of this project's (pip, pytest, bash, mkdocs...)."""
    env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
    words = words[len(env):]
    if not words:
        return None
    if words[0] == "isearle":
        from isearle.cli import main

        return (lambda argv: main(argv)), words[1:]
    if words[0] == "python" and len(words) > 1:
        if words[1] == "-m" and words[2] not in ("pytest", "pip"):
            module = words[2]
            return (lambda argv: _run(lambda: runpy.run_module(module, run_name="__main__"), module, argv)), words[3:]
        if words[1].endswith(".py") and (REPO / words[1]).is_file():
            script = str(REPO / words[1])
            return (lambda argv: _run(lambda: runpy.run_path(script, run_name="__main__"), script, argv)), words[2:]
    return None


def _run(fn, name: str, argv: list[str]) -> None:
    saved = sys.argv
    sys.argv = [name, *argv]
    try:
        fn()
    finally:
        sys.argv = saved


def normalise(args: list[str]) -> list[str]:
    """Documentation shorthand made concrete: `{a,b}` -> a, `[--flag X]` -> --flag X, N -> 2."""
    out = []
    for a in args:
        a = re.sub(r"^\{([^,}]+)(,[^}]*)?\}$", r"\1", a.strip("[]"))
        out.append(PLACEHOLDERS.get(a, a))
    return out


COMMANDS = [(rel(p), shlex.join(words), complete) for p in MARKDOWN for words, complete in commands_of(p)]
PROJECT_COMMANDS = [(p, c, complete) for p, c, complete in COMMANDS if entry_point(shlex.split(c))]


def test_the_docs_show_commands_of_every_entry_point():
    shown = {c.split()[0] if c.startswith("isearle") else c.split()[1] for _, c, _ in PROJECT_COMMANDS}
    assert {"isearle", "app.py", "bench/run_all.py", "bench/demo_latency.py"} <= shown, shown


class Captured(Exception):
    """Raised by the patched `parse_args`: the command's parser and the arguments it was given."""

    def __init__(self, parser: argparse.ArgumentParser, args: list[str]) -> None:
        self.parser, self.args = parser, args


def command_parser(command: str) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser the command builds (captured at its `parse_args`, before it does anything) and its
    arguments, with the documentation's shorthand made concrete."""
    run, args = entry_point(shlex.split(command))

    def capture(self, args=None, namespace=None):
        raise Captured(self, list(args if args is not None else sys.argv[1:]))

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            run(normalise(args))
        except Captured as got:
            return got.parser, got.args
    pytest.fail(f"`{command}` ran without parsing its arguments")


@pytest.mark.parametrize("path,command,complete", PROJECT_COMMANDS,
                         ids=[f"{p}: {c[:60]}" for p, c, _ in PROJECT_COMMANDS])
def test_command_line_parses(path, command, complete):
    """A full command line (a shell block) parses with the command's own parser; a fragment in prose
    names only flags that command has. Nothing is run: parsing ends it."""
    parser, args = command_parser(command)
    if complete:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(args)
            except SystemExit as exit_:  # --help exits with 0
                assert exit_.code == 0, f"{path}: `{command}` does not parse: {err.getvalue().strip()[-300:]}"
        return
    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if sub and args and args[0] in sub[0].choices:
        parser, args = sub[0].choices[args[0]], args[1:]
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in parser._option_string_actions]
    assert unknown == [], f"{path}: `{command}`: {parser.prog} has no {', '.join(unknown)}"


# ---------------------------------------------------------------- pages, links, generated tables


def links(path: Path) -> set[str]:
    return set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")))


def test_every_docs_page_is_linked_from_the_readme_and_in_the_site_nav():
    readme = {link for link in links(REPO / "README.md") if link.startswith("docs/")}
    pages = {f"docs/{p.name}" for p in PAGES if p.name != "index.md"}
    assert pages - readme == set(), "link each docs page from the README's Documentation table"
    assert {p for p in readme if p.endswith(".md")} - pages == set(), "the README links a page that does not exist"
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert {p.name for p in PAGES} == listed


def test_readme_is_a_landing_page_and_a_valid_space_card():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 350
    front = yaml.safe_load(text.split("---\n", 2)[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py" and front["python_version"] == "3.11"
    assert isinstance(front["sdk_version"], str) and isinstance(front["python_version"], str)
    repo, files = front["preload_from_hub"][0].split(" ", 1)
    assert repo in front["models"] and "open_clip_config.json" in files.split(",")
    requirements = (REPO / "requirements.txt").read_text()
    lowest = re.search(r"^gradio>=([\d.]+)", requirements, re.M).group(1)
    assert front["sdk_version"].startswith(lowest), "the Space runs the Gradio that requirements.txt asks for"


def test_settings_table_is_the_code_s():
    """The README's settings table is what `python -m isearle.demo settings` prints."""
    from isearle.demo.settings import settings_table

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("<!-- --8<-- [start:settings] -->\n", 1)[1].split("\n<!-- --8<-- [end:settings] -->", 1)[0]
    assert table == settings_table(), "paste the output of `python -m isearle.demo settings` into the README"


def contract_layers() -> list[set[str]]:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"]
    return [{m.strip().removeprefix("isearle.") for m in line.split("|")} for line in layers.strip().splitlines()]


def module_name(span: str) -> str:
    return span.removeprefix("isearle/").removesuffix(".py").rstrip("/")


def test_architecture_page_lists_the_layers_of_importlinter_in_order():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    items = re.findall(r"^\d+\. (.*)$", text.split("## Import layers", 1)[1].split("\n## ", 1)[0], re.M)
    known = set().union(*contract_layers())
    documented = [{module_name(s) for s in re.findall(r"`([^`]+)`", item)} & known for item in items]
    assert [layer for layer in documented if layer] == contract_layers()


def test_architecture_page_names_every_module():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    table = text.split("## Modules", 1)[1]
    named = {module_name(s) for s in re.findall(r"`(isearle/[^`]+)`", table)}
    modules = {m.name for m in pkgutil.iter_modules(isearle.__path__)}
    assert modules - named == set(), "add the module to the table in docs/architecture.md"


def test_performance_results_are_generated_not_typed():
    text = RESULTS.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith("<!-- written by `python bench/run_all.py") and "--markdown docs/performance-results.md" in first
    assert "--quick" not in first, "the results page holds measurements, not a smoke test"
    for line in ("Command:", "Date:", "Machine:", "Load (1/5/15 min)", "### Goals", "### All rows"):
        assert line in text
    assert '--8<-- "performance-results.md"' in (DOCS / "performance.md").read_text()


PROCESS_WORDS = re.compile(r"\b(today|issue'?s?|lent|this session|previous session|previous run|before this)\b", re.I)
ALLOWED = re.compile(r"ONNX Runtime session|scope=\"session\"", re.I)


def user_text() -> dict[str, str]:
    """What a user reads: the README, docs/ and every command's help."""
    from isearle.cli import build_parser

    texts = {rel(p): p.read_text(encoding="utf-8") for p in [*MARKDOWN, RESULTS]}
    parser = build_parser()
    texts["isearle --help"] = parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts.update({f"isearle {name} --help": p.format_help() for name, p in sub.choices.items()})
    from isearle.demo.settings import add_arguments

    app = argparse.ArgumentParser()
    add_arguments(app, {})
    texts["python app.py --help"] = app.format_help()
    return texts


def test_no_process_words_where_a_user_reads():
    found = [f"{where}: {line.strip()[:120]}" for where, text in user_text().items() for line in text.splitlines()
             if PROCESS_WORDS.search(ALLOWED.sub("", line))]
    assert found == [], "describe the software, not how it was made:\n" + "\n".join(found)


@pytest.mark.skipif(os.environ.get("ISEARLE_SKIP_MKDOCS") == "1", reason="ISEARLE_SKIP_MKDOCS=1")
def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a missing page or include fails."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    import subprocess

    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_file_the_docs_name_exists():
    """A path in backticks (`isearle/oti.py`, `bench/bench_query.py`, `tests/test_x.py`...) names a file or
    folder of the repository."""
    missing = []
    for page in MARKDOWN:
        for span in re.findall(r"`((?:isearle|bench|tests|scripts|assets|docs)/[\w./-]*)", page.read_text(encoding="utf-8")):
            path = span.split("::")[0].rstrip(".")
            if not (REPO / path).exists():
                missing.append(f"{rel(page)}: {span}")
    assert missing == []


def test_the_tour_and_the_lesson_name_every_inspector_tab():
    """docs/demo.md walks through each tab of the inspector, and the lesson uses them, by their labels."""
    tabs = re.findall(r'gr\.Tab\("([^"]+)"', (REPO / "app_inspector.py").read_text(encoding="utf-8"))
    assert len(tabs) >= 6
    tour = (DOCS / "demo.md").read_text(encoding="utf-8").replace("S\\*", "S*")
    headings = [h.lower() for h in re.findall(r"^### \d+\. (.+)$", tour, re.M)]
    assert [t.lower() for t in tabs] == headings
    lesson = (DOCS / "teaching.md").read_text(encoding="utf-8").replace("S\\*", "S*")
    assert [t for t in tabs if f"**{t}**" not in lesson] == ["Take S* with you"]


def prose(text: str) -> str:
    """Markdown without its fenced blocks and code spans."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def test_pseudo_word_is_escaped_in_prose():
    """S* outside code is written S\\*: Markdown reads two bare asterisks on a line as emphasis."""
    bare = [f"{rel(p)}: {line.strip()[:100]}" for p in MARKDOWN
            for line in prose(p.read_text(encoding="utf-8")).splitlines() if re.search(r"(?<![\\\w])S\*(?!\*)", line)]
    assert bare == []
