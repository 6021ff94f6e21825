"""The page's own words render everywhere: no emoji in the text ui/ and studio/ put on the page.

An emoji (a character drawn as a picture by default) needs an emoji font; a browser without one, as
on a bare Linux desktop or a server's headless chromium, shows an empty box instead. Symbols drawn
as text (⚠ · … ▰) are in the common text fonts (DejaVu, Segoe UI Symbol) and are kept.
"""

from __future__ import annotations

import ast
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Unicode's Emoji_Presentation=Yes characters below U+1F000 (emoji-data.txt, Unicode 15); every
# character from U+1F000 up that is a symbol counts too.
BMP_EMOJI = set("⌚⌛⏩⏪⏫⏬⏰⏳◽◾☔☕♈♉♊♋♌♍♎♏♐♑♒♓♿⚓⚡⚪⚫⚽⚾⛄⛅⛎⛔⛪"
                "⛲⛳⛵⛺⛽✅✊✋✨❌❎❓❔❕❗➕➖➗➰➿⬛⬜⭐⭕")
VARIATION_EMOJI = "\ufe0f"  # asks for the emoji form of the character before it


def is_emoji(char: str) -> bool:
    return (char in BMP_EMOJI or char == VARIATION_EMOJI
            or (ord(char) >= 0x1F000 and unicodedata.category(char).startswith("S")))


def emoji_in_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string constant in a module that holds an emoji (docstrings and comments
    are not on the page, but a docstring with one would be caught too: none should need one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and any(map(is_emoji, node.value)):
            found.append((node.lineno, node.value))
    return found


def test_the_checker_sees_emoji():
    assert all(map(is_emoji, "📊⏳✅🔬"))
    assert not any(map(is_emoji, "⚠·…▰▱✓⟨⟩≠✗ 中文"))


def test_no_emoji_in_the_pages_text():
    found = {str(path.relative_to(ROOT)): hits
             for folder in ("ui", "studio") for path in sorted((ROOT / folder).glob("*.py"))
             if (hits := emoji_in_strings(path))}
    assert not found, found


def test_the_stats_title_is_plain_text():
    from studio.chat import STATS_TITLE

    assert STATS_TITLE.strip() and STATS_TITLE.isascii()
