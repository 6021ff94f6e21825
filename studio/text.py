"""Text from run files and visitors, made safe to put in the page's Markdown."""

from __future__ import annotations

import html
import re

_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]|~#"})


def plain(text) -> str:
    """`text` shown as written inside Markdown: HTML tags (`<img>`, `<details>`) and Markdown
    syntax (links, emphasis, tables) in it are escaped, not rendered."""
    return html.escape(str(text), quote=False).translate(_MARKDOWN)


_SERVER_PATH = re.compile(r"(?<![\w.~/])(?:~|\.{1,2})?/(?:[\w.@+-]+/)+([\w.@+-]+)")


def hide_paths(text: str) -> str:
    """`text` with each file path in it cut to its last part ("/srv/app/runs/x.json" -> "x.json"):
    visitors see which file, not how the server's disk is laid out."""
    return _SERVER_PATH.sub(lambda m: m.group(1), str(text))
