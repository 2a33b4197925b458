"""LightningCLI's parser with errors of a few lines: the option, the value and what was expected.

jsonargparse reports a rejected option after the whole usage text (some 70 lines for ``fit``) and, for a
value that fits none of a union's types, with one paragraph per type tried. The command prints only
``lightning-taylor fit: error:`` and the lines that name the option, the value and the expectation, and a
hint; ``LIGHTNING_TAYLOR_TRACEBACK=1`` restores jsonargparse's full text, as for the project's own errors.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

#: jsonargparse's lines that say how it searched rather than what is wrong (compared without a leading "- ")
_SEARCH_LINES = ("Subtypes:", "Errors:", "Given value type:", "Given value:", "Expected a <class 'NoneType'>",
                 "Expected a path but", "Does not validate against any of the Union subtypes",
                 "Not a valid subclass of", "Subclass types expect one of:", "a class path (str)", "a dict with",
                 "a dict without")
MAX_DETAIL_LINES = 4
#: longer lines (jsonargparse quotes whole values, e.g. a list of callbacks) are cut
MAX_LINE = 200


def short_message(message: str) -> str:
    """The first line of jsonargparse's ``message`` and at most :data:`MAX_DETAIL_LINES` lines of detail."""
    lines = [_cut(line.strip()) for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    details: list[str] = []
    for line in lines[1:]:
        if line.removeprefix("- ").startswith(_SEARCH_LINES) or line in details:
            continue
        details.append(line)
    shown = details[:MAX_DETAIL_LINES]
    if len(details) > len(shown):
        shown.append(f"... ({len(details) - len(shown)} more lines)")
    return "\n  ".join([lines[0], *shown])


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 5] + " ..."


class TaylorArgumentParser(LightningArgumentParser):
    """A :class:`LightningArgumentParser` whose command-line errors are short (see the module docstring)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if os.environ.get("LIGHTNING_TAYLOR_TRACEBACK") or not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {short_message(message)}\n"
                         f"`{prog} --help` lists the options; LIGHTNING_TAYLOR_TRACEBACK=1 shows the full text.\n")
        parser.exit(2)
