"""One error policy for every script in ``scripts/``: a user's mistake is one line and exit code 2.

User errors are what bad input raises: ``ValueError`` (bad values, malformed JSON, undecodable
text), ``OSError`` (missing files, a folder where a file was expected, an unreachable or silent
Hub, which :mod:`hf_koleo.hub` raises as ``ConnectionError`` / ``TimeoutError``) and YAML syntax
errors. They print ``<script>: error: <message>`` on stderr and exit with 2, as argparse does for
a bad option. Anything else is a bug and keeps its traceback; ``--debug`` (anywhere on the command
line, or ``HF_KOLEO_DEBUG=1``, which child processes inherit) keeps the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, yaml.YAMLError)
DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT = "HF_KOLEO_DEBUG"
EXIT_USER_ERROR = 2

Result = TypeVar("Result")


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages such as YAML's are joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def debug_requested(argv: list[str] | None = None) -> bool:
    """Whether tracebacks were asked for; removes ``--debug`` from ``argv`` (``sys.argv`` by default)."""
    argv = sys.argv if argv is None else argv
    if DEBUG_FLAG in argv:
        while DEBUG_FLAG in argv:
            argv.remove(DEBUG_FLAG)
        os.environ[DEBUG_ENVIRONMENT] = "1"  # processes a script re-launches inherit it
    return os.environ.get(DEBUG_ENVIRONMENT, "").lower() in ("1", "true", "yes")


def run_main(main: Callable[[], Result], argv: list[str] | None = None) -> Result:
    """Call a script's ``main()`` under the policy above.

    Args:
        main: the script's entry point; it reads its options from ``sys.argv``.
        argv: the command line to strip ``--debug`` from (default ``sys.argv``).
    """
    debug = debug_requested(argv)
    try:
        return main()
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{Path(sys.argv[0]).name}: error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


__all__ = ["USER_ERRORS", "debug_requested", "one_line", "run_main"]
