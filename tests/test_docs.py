"""The documentation site builds strictly and cannot rot.

* The site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``, offline.
* The build fails on a broken internal link, on a page missing from the navigation and on a generated
  page out of date with the method registry: each fault is made in a temporary copy and seen to fail.
* A method registered from a file outside the repository gets its page, its README row and its
  navigation entry from ``dfkd-bench docs`` alone, and the site builds with it.
* Every method page's protocol cards are what ``dfkd-bench list --card`` prints.
* Every ``dfkd-bench`` command of the pages' ``bash`` blocks parses, names registered methods and known
  settings, and its experiment files exist.
"""

from __future__ import annotations

import html
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_readme import bash_commands, method_examples


DOCS = REPO_ROOT / "docs"
MKDOCS = [sys.executable, "-m", "mkdocs"]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2: noise in a failure message


def build(root: Path, site: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MKDOCS, "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=env or ENV, cwd=root)


def copy_of_the_site_sources(tmp_path: Path) -> Path:
    """A temporary repository holding what the build reads: mkdocs.yml, docs/, README.md (snippets),
    and links to results/ (figures) and experiments/ (snippets, reproduction files)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO_ROOT / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copy(REPO_ROOT / "README.md", root / "README.md")
    shutil.copytree(DOCS, root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("results", "experiments"):
        (root / folder).symlink_to(REPO_ROOT / folder)
    return root


def test_the_site_builds_strictly_with_a_page_per_method_in_the_navigation(tmp_path):
    from dfkd_bench.method_api import list_methods

    result = build(REPO_ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    home = (tmp_path / "site" / "index.html").read_text()
    for name, cls in list_methods().items():
        assert (tmp_path / "site" / "methods" / f"{name}.html").is_file(), name
        entry = re.search(rf'href="methods/{name}.html" class="md-nav__link[^"]*">\s*<span class="md-ellipsis">\s*([^<]+?)\s*<',
                          home)
        assert entry and html.unescape(entry.group(1)) == (cls.label or name), f"{name} is not in the navigation under its label"
    assert (tmp_path / "site" / "results" / "zoo" / "report" / "critical_difference.png").is_file()  # a figure


def test_the_build_fails_on_a_broken_link_a_page_missing_from_the_navigation_and_a_stale_page(tmp_path):
    """The three faults in one copy (one build, to keep the test short): each is a warning of its own,
    and a strict build fails on any one warning, so each alone fails it."""
    root = copy_of_the_site_sources(tmp_path)
    with (root / "docs" / "running.md").open("a") as page:
        page.write("\nSee [the missing page](no-such-page.md) and [a missing section](results.md#no-such-heading).\n")
    (root / "docs" / "orphan.md").write_text("# A page nobody added to mkdocs.yml\n")
    page = root / "docs" / "methods" / "mad.md"
    text = page.read_text()
    assert "| `ema_momentum` | `0.95` |" in text
    page.write_text(text.replace("| `ema_momentum` | `0.95` |", "| `ema_momentum` | `0.9` |"))  # a hand edit
    result = build(root, tmp_path / "site")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    # each fault is its own warning, and the strict build fails on any one warning
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    for fault in ("no-such-page.md", "no-such-heading", 'not included in the "nav"',
                  "docs/methods/mad.md is out of date with the code: run `dfkd-bench docs`"):
        assert sum(fault in line for line in warnings) == 1, (fault, out)
    assert "orphan.md" in out and "Aborted with 4 warnings in strict mode!" in out, out


def test_the_committed_generated_pages_are_up_to_date(capsys):
    from dfkd_bench.cli import main

    assert main(["docs", "--check", "--docs-dir", str(DOCS), "--readme", str(REPO_ROOT / "README.md")]) == 0, \
        capsys.readouterr().err


def test_docs_check_names_what_is_stale_and_docs_repairs_it(tmp_path, capsys):
    from dfkd_bench.cli import main

    root = copy_of_the_site_sources(tmp_path)
    docs = root / "docs"
    (docs / "settings.md").write_text((docs / "settings.md").read_text().replace("| `epochs` | `300` |", "| `epochs` | `30` |"))
    (docs / "methods" / "gone.md").write_text("# a method that is no longer registered\n")
    assert main(["docs", "--check", "--docs-dir", str(docs), "--readme", ""]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of date with the code: ") and err.count("\n") == 1, err
    assert f"{docs / 'settings.md'}" in err and f"{docs / 'methods' / 'gone.md'} (no registered method generates it)" in err
    assert main(["docs", "--docs-dir", str(docs), "--readme", str(root / "README.md")]) == 0
    assert not (docs / "methods" / "gone.md").exists()
    assert main(["docs", "--check", "--docs-dir", str(docs), "--readme", str(root / "README.md")]) == 0
    assert main(["docs", "--docs-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'} is not a folder")
    bare = tmp_path / "README-without-markers.md"
    bare.write_text("# a README whose table is typed by hand\n")
    assert main(["docs", "--docs-dir", str(docs), "--readme", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bare} has no generated methods table") and err.count("\n") == 1, err


def test_a_newly_registered_method_gets_its_page_and_nav_entry_from_the_generator_alone(tmp_path):
    """The documentation's example pool method, dropped in through $DFKD_BENCH_METHOD_PATH:
    `dfkd-bench docs` in a copy of the sources writes its page and its README row (and nothing else),
    and the copy's site builds with the page in the navigation, mkdocs.yml untouched."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "pixel_ce.py").write_text(method_examples()["pixel_ce"])
    env = {**ENV, "DFKD_BENCH_METHOD_PATH": str(plugins)}
    cli = [sys.executable, "-m", "dfkd_bench.cli"]
    root = copy_of_the_site_sources(tmp_path)
    write = subprocess.run([*cli, "docs"], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert write.returncode == 0, write.stderr
    assert write.stdout.splitlines() == ["wrote docs/methods/index.md", "wrote docs/methods/pixel_ce.md",
                                         "wrote README.md (methods table)"], write.stdout
    page = (root / "docs" / "methods" / "pixel_ce.md").read_text()
    assert page.startswith("# Pixel-CE\n\n<!-- generated by `dfkd-bench docs`") and "pixel_ce.py (in $DFKD_BENCH_METHOD_PATH)" in page
    assert "| `synthesis_steps` |" in page  # its settings, from its Params
    assert "(docs/methods/pixel_ce.md) | `pixel_ce` |" in (root / "README.md").read_text()
    assert (root / "mkdocs.yml").read_text() == (REPO_ROOT / "mkdocs.yml").read_text()  # no hand edit
    result = build(root, tmp_path / "site", env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'href="methods/pixel_ce.html"' in (tmp_path / "site" / "index.html").read_text()


# ------------------------------------------------------------ the method pages ---

def card_tables(text: str) -> dict[str, list[list[str]]]:
    """``dfkd-bench list --card`` output: per dataset, the rows as [setting, paper, ours paper, ours common,
    mark], read at the columns the header line sets."""
    tables: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  setting "):
            dataset = lines[i - 2].split(":", 1)[0]
            starts = [line.index(title) for title in ("setting", "paper / official code", "ours (paper)",
                                                       "ours (common)")]
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("  ") or not row.strip():
                    break
                cells = [row[a:b].strip() for a, b in zip(starts, starts[1:])]
                value, _, mark = row[starts[3]:].partition("  ")  # the mark follows the last column's padding
                rows.append([*cells, value.strip(), mark.strip()])
            tables[dataset] = rows
    return tables


def page_tables(text: str) -> dict[str, list[list[str]]]:
    """A method page's card tables: per ``### dataset`` heading of its paper protocols."""
    section = text.split("## Paper protocols", 1)[1].split("\n## ", 1)[0]
    tables = {}
    for block in section.split("\n### ")[1:]:
        dataset = block.split("\n", 1)[0].strip()
        rows = [line for line in block.splitlines() if line.startswith("| `")]
        tables[dataset] = [[cell.strip().replace("\\|", "|").strip("`")
                            for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return tables


def test_every_method_page_carries_the_cards_of_list_card(capsys):
    from dfkd_bench.cli import main
    from dfkd_bench.method_api import list_methods

    for name, cls in list_methods().items():
        page = (DOCS / "methods" / f"{name}.md").read_text()
        if not cls.paper_protocols:
            assert "None yet" in page.split("## Paper protocols", 1)[1]
            continue
        assert main(["list", "--card", name]) == 0
        printed = capsys.readouterr().out
        assert page_tables(page) == card_tables(printed), name
        for dataset, protocol in cls.paper_protocols.items():
            assert f"selection {protocol.selection}" in printed and f"selection `{protocol.selection}`" in page
            section = page.split(f"### {dataset}", 1)[1].split("###", 1)[0]
            assert (f"{protocol.accuracy:g}" if protocol.accuracy is not None  # none read: the card says so
                    else "No published number could be read") in section, (name, dataset)


def test_the_card_reader_sees_a_changed_cell():
    printed = ("protocol card: X (x)\n\nmnist: published 1 %, selection best -- s\nofficial code: c\n"
               "  setting     paper / official code  ours (paper)  ours (common)\n"
               "  batch_size  512                    512           128            * common differs\n")
    assert card_tables(printed) == {"mnist": [["batch_size", "512", "512", "128", "* common differs"]]}
    page = ("## Paper protocols\n\n### mnist\n\n| setting | paper | a | b | mark |\n| --- |\n"
            "| `batch_size` | 512 | 512 | 256 | * common differs |\n")
    assert page_tables(page) != card_tables(printed)


def test_a_method_page_holds_its_settings_and_its_chosen_lines():
    from dfkd_bench.method_api import get_method, param_fields

    page = (DOCS / "methods" / "dafl.md").read_text()
    for name in param_fields(get_method("dafl")):
        assert f"| `{name}` |" in page, name
    assert "| `entropy_log_base` | `10` |" in page
    chosen = page.split("## Choices where the paper is silent", 1)[1]
    assert "# CHOSEN: 28 x 28 inputs with conv1 padding 2" in chosen  # methods/dafl.py's own
    assert "CHOSEN: train mode for both under the common protocol" in chosen  # its base's (ZooGeneratorParams)


def test_chosen_passages_are_found_in_comments_docstrings_and_strings(tmp_path):
    from dfkd_bench.report.method_docs import chosen_passages

    source = tmp_path / "m.py"
    source.write_text('"""Doc.\n\nCHOSEN: a docstring paragraph\nthat goes on.\n\nNot this."""\n\n\n'
                      "class A:\n    # CHOSEN: a comment block\n    # of two lines\n    x = 1\n"
                      "    y = 2  # CHOSEN inline\n    z = f(\"text, CHOSEN: in a string\")\n    w = 3  # '#' CHOSEN\n"
                      "    v = dict(\n        # CHOSEN: an argument\n        a=1,\n        b=2,\n    )\n")
    found = chosen_passages(source)
    assert [(p.where, p.text) for p in found] == [
        ("module docstring", "CHOSEN: a docstring paragraph\nthat goes on."),
        ("`A`", "# CHOSEN: a comment block\n# of two lines\nx = 1"),
        ("`A`", "y = 2  # CHOSEN inline"),
        ("`A`", 'z = f("text, CHOSEN: in a string")'),
        ("`A`", "w = 3  # '#' CHOSEN"),
        ("`A`", "# CHOSEN: an argument\na=1,"),
    ]


# ------------------------------------------------------- commands in the pages ---

def docs_commands() -> list[tuple[str, str]]:
    """(page, command) for every ``dfkd-bench`` command in the pages' ```bash blocks, with optional
    ``[...]`` parts and ``...`` placeholders removed (a synopsis line is parsed as its minimal form)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for command in bash_commands(page.read_text()):
            if command.startswith("dfkd-bench "):
                minimal = re.sub(r"\s*\[[^\]]*\]", "", command)
                minimal = " ".join(token for token in minimal.split() if token not in ("...", "…"))
                found.append((str(page.relative_to(REPO_ROOT)), minimal))
    return found


def test_the_pages_show_commands():
    pages = {page for page, _ in docs_commands()}
    assert {"docs/cli.md", "docs/running.md", "docs/getting-started.md"} <= pages, pages


@pytest.mark.parametrize("page,command", docs_commands())
def test_every_command_of_the_pages_parses(page, command):
    from dfkd_bench.cli import build_parser
    from dfkd_bench.config import check_override_keys, parse_overrides
    from dfkd_bench.method_api import get_method

    argv = shlex.split(command)[1:]
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{page}: `{command}` does not parse")
    assert not extra, f"{page}: `{command}`: unknown arguments {extra}"
    methods = [m for m in (getattr(args, "methods", None) or "").split(",") if m and m.isidentifier()]
    for name in methods:
        get_method(name)  # a renamed method fails here
    if getattr(args, "set", None) and methods:
        check_override_keys(methods, parse_overrides(args.set))
    for token in argv:
        if token.endswith(".toml"):
            assert (REPO_ROOT / token).is_file(), f"{page}: `{command}`: {token} does not exist"
