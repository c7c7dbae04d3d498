"""The one place that turns library errors into exit codes. Every `__main__` goes through `run_cli`."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from .errors import UserError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a `UserError` becomes one `error: ...` line on stderr and exit status 2."""
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


class ArgumentParser:
    """`argparse.ArgumentParser` whose errors are one `UserError` line instead of usage + exit."""

    def __new__(cls, *args, **kwargs):
        import argparse

        class _Parser(argparse.ArgumentParser):
            def error(self, message):  # argparse would print usage and sys.exit(2)
                raise UserError(message)

        return _Parser(*args, **kwargs)
