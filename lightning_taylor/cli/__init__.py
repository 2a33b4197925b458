"""The ``lightning-taylor`` command: ``fit`` / ``validate`` / ``test`` / ``predict`` (a LightningCLI,
:mod:`~lightning_taylor.cli.fit`) and ``edit`` (:mod:`~lightning_taylor.cli.edit`).

Bad settings and non-finite values end the command with a one-line message (exit status 2 and 1), and so
does a file that cannot be written (a full disk, no permission, a read-only file system: exit status 1); set
``LIGHTNING_TAYLOR_TRACEBACK=1`` for the full traceback. A fit stopped by SIGTERM exits 143 after saving a
checkpoint (:class:`~lightning_taylor.callbacks.FaultTolerance`, docs/faults.md).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Sequence

from lightning_taylor._atomic import write_error
from lightning_taylor.cli.fit import (
    DEMO_CONFIG,
    DEMO_DIR,
    SUBCOMMANDS,
    TaylorCLI,
    cli,
    with_demo_config,
    with_run_config,
)
from lightning_taylor.console import quiet_lightning
from lightning_taylor.errors import InputError, NonFiniteError, WriteError


def overview() -> str:
    """``lightning-taylor --help``: what the command is and its subcommands."""
    from lightning_taylor.cli.edit import SUMMARY

    commands = {**SUBCOMMANDS, "edit": SUMMARY}
    width = max(map(len, commands))
    lines = ["usage: lightning-taylor SUBCOMMAND [options]", "",
             "Incremental learning for pre-trained Vision Transformers by second-order task arithmetic (ITA / IEL).",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in commands.items()]
    lines += ["", "`lightning-taylor SUBCOMMAND --help` lists a subcommand's options; `lightning-taylor fit` alone "
              "runs the offline demo."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: one-line errors for bad input (exit 2) and non-finite values (exit 1)."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_lightning()
    try:
        if args[:1] == ["edit"]:  # a plain subcommand next to LightningCLI's fit / validate / test / ...
            from lightning_taylor.cli.edit import main as edit_main

            edit_main(args[1:])
        elif not args or args[0] in ("-h", "--help"):
            print(overview())  # noqa: T201 (the command's output)
            if not args:
                raise SystemExit(2)
        else:
            # LightningCLI reads sys.argv (and warns when given both it and `args`).
            sys.argv[1:] = with_demo_config(with_run_config(args))
            cli()
    except (InputError, NonFiniteError, WriteError) as err:
        if os.environ.get("LIGHTNING_TAYLOR_TRACEBACK"):
            raise
        print(f"lightning-taylor: error: {err}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2 if isinstance(err, InputError) else 1) from None
    except OSError as err:
        if os.environ.get("LIGHTNING_TAYLOR_TRACEBACK") or err.errno not in _WRITE_ERRORS:
            raise
        # A write outside the project's own files (Lightning's config.yaml, a logger's metrics.csv).
        what = "a file" if err.filename is None else "the file"
        print(f"lightning-taylor: error: {write_error(err, err.filename or '?', what)}", file=sys.stderr)  # noqa: T201
        raise SystemExit(1) from None


#: OS errors that only a write raises: reported briefly wherever they come from.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


__all__ = ["DEMO_CONFIG", "DEMO_DIR", "TaylorCLI", "cli", "main", "overview"]
