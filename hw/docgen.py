"""The command line shared by the generated reference pages (``docs/isa.md``,
``docs/registers.md``): write the page, or with ``--check`` say whether it is stale."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["generated_doc_main"]


def generated_doc_main(argv: list[str] | None, *, module: str, description: str, path: Path,
                       text: Callable[[], str]) -> int:
    """Write ``text()`` to ``path`` (or, with ``--check``, exit 1 if ``path`` differs).

    Parameters
    ----------
    argv : list of str or None
        Command-line arguments (``sys.argv[1:]`` when None).
    module : str
        The module run with ``python -m``, for the usage line and the stale message.
    description : str
        What the command generates (``--help``).
    path : Path
        The page.
    text : callable
        Returns the page's text.

    Returns
    -------
    int
        The exit status.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from the generated text")
    args = parser.parse_args(argv)
    page = text()
    if args.check:
        if not path.is_file() or path.read_text() != page:
            print(f"{path} is stale: run `python -m {module}`", file=sys.stderr)
            return 1
        return 0
    path.write_text(page)
    print(f"wrote {path}")
    return 0
