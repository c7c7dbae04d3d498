"""The one place that turns library errors into exit codes. Every `__main__` goes through `run_cli`."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

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


def quiet_toolchain():
    """Silence the toolchain's import-time chatter (progress bars, 'untested version' warnings)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' MIL pass progress bars
    os.environ.setdefault("ET_COREML_LOG_LEVEL", "ERROR")  # "exported with CoreML specification version 7" notice
    for name in ("coremltools", "torchao", "executorch", "onnxscript", "torch.onnx", "torch._export", "torch.export",
                 "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    for cat in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
