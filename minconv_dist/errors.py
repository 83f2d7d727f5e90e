"""How a job ends on a user error (a bad flag value, a store that is not there, a model URI that does not
resolve): one line on stderr that says what was wrong and where, exit code 2, no traceback. `--debug` (anywhere
on the command line) shows the traceback instead."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

# ConfigError is a ValueError; FileNotFoundError, PermissionError and unreachable stores are OSErrors.
USER_ERRORS = (ValueError, KeyError, OSError)


def run_job(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run a job's `main(argv)` and turn a user error into one line and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        main(args)
    except USER_ERRORS as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0
