"""Logging for rule scripts: everything a step says goes to its Snakemake log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from .errors import HistoflowError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"histoflow.{name.rsplit('.', 1)[-1]}")


@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Send logging, stdout and stderr (progress bars included) to ``path`` for the block."""
    if not path:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as handle:
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                yield
        except HistoflowError as err:
            # a user can act on it: the log keeps the traceback, the terminal gets one line
            logging.getLogger("histoflow").exception("failed: %s", err)
            print(f"histoflow: {err} (log: {path})", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except Exception as err:  # a bug: the traceback goes to the log and to the terminal
            logging.getLogger("histoflow").exception("failed: %s", err)
            raise
        finally:
            root.removeHandler(handler)


def first_log(snakemake) -> str | None:
    """The first log file of a rule, or None when the rule declares none."""
    try:
        return str(snakemake.log[0])
    except (IndexError, AttributeError):
        return None
