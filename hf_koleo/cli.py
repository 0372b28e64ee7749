"""One error policy for every script in ``scripts/``: a user's mistake is one line and exit code 2.

User errors are what bad input raises: ``ValueError`` (bad values, malformed JSON, undecodable
text), ``OSError`` (missing files, a folder where a file was expected, an unreachable or silent
Hub, which :mod:`hf_koleo.hub` raises as ``ConnectionError`` / ``TimeoutError``), YAML syntax
errors, and two ``RuntimeError``s of training: another run holds the ``--output_dir``
(``OutputDirLockedError``) and no ``--resume`` checkpoint loads (``CheckpointLoadError``). They
print ``<script>: error: <message>`` on stderr and exit with 2, as argparse does for a bad option;
an error that torch re-raised from a ``DataLoader`` worker prints only the original error's message.
Anything else is a bug and keeps its traceback; ``--debug`` (anywhere on the command line, or
``HF_KOLEO_DEBUG=1``, which child processes inherit) keeps the traceback for user errors too.

Several processes (``accelerate launch``, ``torchrun``): the main process (rank 0) prints the line
and the others stay silent; under this project's own launcher for ``accelerate launch --cpu
--num_processes N`` (:mod:`hf_koleo.training.launch`) the launcher prints it, once."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, yaml.YAMLError)
DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT = "HF_KOLEO_DEBUG"
EXIT_USER_ERROR = 2
# How torch's ExceptionWrapper re-raises an error of a DataLoader worker (or pin-memory thread).
_WRAPPED_ERROR = re.compile(r"Caught \w+ in .*?\.\nOriginal Traceback \(most recent call last\):\n", re.DOTALL)
_TRACEBACK_HEADER = "Traceback (most recent call last):\n"
_EXCEPTION_TYPE = re.compile(r"[A-Za-z_][\w.]*: ")

Result = TypeVar("Result")


def user_error_types() -> tuple[type[BaseException], ...]:
    """:data:`USER_ERRORS` and the training errors that mean bad input (imported only when asked)."""
    from .training.checkpoint import CheckpointLoadError
    from .training.lock import OutputDirLockedError

    return (*USER_ERRORS, OutputDirLockedError, CheckpointLoadError)


def original_message(text: str) -> str:
    """The original error's message in the text of an error torch re-raised from a DataLoader worker.

    Its traceback (of the last exception, when they were chained) and its type name are dropped;
    any other text is returned as it is.
    """
    if not _WRAPPED_ERROR.match(text):
        return text
    lines = text.rsplit(_TRACEBACK_HEADER, 1)[-1].splitlines()
    start = next((index for index, line in enumerate(lines) if line and not line[0].isspace()), None)
    if start is None:
        return text
    message = "\n".join(lines[start:])
    type_name = _EXCEPTION_TYPE.match(message)
    return message[type_name.end() :] if type_name else message


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages such as YAML's are joined with '; ')."""
    lines = [line.strip() for line in original_message(str(error)).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def report_user_error(line: str) -> None:
    """Print ``line`` on stderr from the process that speaks for the run; record it for the launcher."""
    from .training.launch import record_worker_error, should_print_user_error

    record_worker_error(line)
    if should_print_user_error():
        print(line, file=sys.stderr, flush=True)


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
    except Exception as error:
        if debug or not isinstance(error, user_error_types()):
            raise
        report_user_error(f"{Path(sys.argv[0]).name}: error: {one_line(error)}")
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as interrupted:  # Ctrl-C, or SIGTERM / SIGINT where a run could not stop cleanly
        if debug:
            raise
        report_user_error(f"{Path(sys.argv[0]).name}: {str(interrupted) or 'interrupted by SIGINT'}")
        sys.exit(getattr(interrupted, "exit_code", 130))


__all__ = ["USER_ERRORS", "debug_requested", "one_line", "original_message", "run_main", "user_error_types"]
