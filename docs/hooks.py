"""MkDocs hooks: add the reference pages, generated from the code (``traintel.reference.PAGES``)."""

from __future__ import annotations

import re
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from traintel.reference import PAGES

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|data|attr|mod|exc|obj):(?=<code>)")
"""A Sphinx role before a code span (``:func:`name```): the docstrings' cross-reference markup."""


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    """Add each generated page; a hand-written file in its place is an error, not silently replaced."""
    for path, page in PAGES.items():
        if files.get_file_from_path(path) is not None:
            msg = f"docs/{path} is generated from the code (traintel.reference): remove that file"
            raise PluginError(msg)
        files.append(File.generated(config, path, content=page()))
    return files


def on_page_content(html: str, page: Page, **_: Any) -> str:
    """Drop the Sphinx role markers the rendered docstrings keep, leaving the code span."""
    return _ROLE.sub("", html)
