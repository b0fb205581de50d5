"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml; excluded from the site itself).

* **The methods' navigation**: every generated page of ``docs/methods/`` is appended to the nav
  section that holds ``methods/index.md``, in name order, so a newly registered method needs no
  edit of mkdocs.yml: ``dfkd-bench docs`` writes its page and the nav follows.
* **Freshness**: the (strict) build fails when a generated file (a method page, the methods index, the
  settings page, the README's methods table) differs from what ``dfkd-bench docs`` writes now.
* **Committed figures**: the files under ``results/`` that a page links to (``../results/...``
  from ``docs/``; not Markdown, which would become pages) are added to the site as they are, so the committed figures are shown without
  a copy in ``docs/``; a link to a file that is not there stays broken and fails the strict build.
* **Snippets**: ``--8<--`` includes are read relative to the repository root (the folder of
  mkdocs.yml), wherever ``mkdocs`` is started.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.dfkd_bench")
_RESULTS_LINK = re.compile(r"\]\(((?:\.\./)+)(results/[^)\s#]+)\)")


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_config(config):
    root = _root(config)
    snippets = config.mdx_configs.setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(root)]
    methods = sorted(p.relative_to(config.docs_dir).as_posix()
                     for p in Path(config.docs_dir).glob("methods/*.md") if p.name != "index.md")

    def fill(items) -> bool:
        for item in items or []:
            children = next(iter(item.values())) if isinstance(item, dict) else None
            if isinstance(children, list):
                if "methods/index.md" in children:
                    children[:] = ["methods/index.md", *methods]
                    return True
                if fill(children):
                    return True
        return False

    if not fill(config.nav):
        raise PluginError("mkdocs.yml: no nav section holds methods/index.md, where the method pages go")
    return config


def on_pre_build(config):
    from dfkd_bench.report.method_docs import stale_files

    root = _root(config)
    for path in stale_files(Path(config.docs_dir), root / "README.md"):
        # a warning, so that the strict build lists it with every other fault and then fails
        log.warning(f"{path} is out of date with the code: run `dfkd-bench docs` in {root} and commit the result")


def on_files(files, config):
    docs = Path(config.docs_dir).resolve()
    root = _root(config)
    wanted: set[str] = set()
    for page in docs.rglob("*.md"):
        depth = len(page.relative_to(docs).parts) - 1
        for ups, target in _RESULTS_LINK.findall(page.read_text()):
            if len(ups) // 3 == depth + 1 and (root / target).is_file() and not target.endswith(".md"):
                wanted.add(target)
    for uri in sorted(wanted):
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(root / uri)))
    return files


def on_page_markdown(markdown, page, config, files):
    """``../results/x.png`` (right when docs/*.md is read in the repository) becomes the site's own
    copy, ``results/x.png``; a link to a file that does not exist is left to fail the build."""
    depth = page.file.src_uri.count("/")

    def local(match):
        ups, target = match.group(1), match.group(2)
        if len(ups) // 3 != depth + 1:
            return match.group(0)
        return f"]({'../' * depth}{target})"

    return _RESULTS_LINK.sub(local, markdown)
