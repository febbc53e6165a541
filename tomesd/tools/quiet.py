"""Silencing diffusers' known-harmless noise around model loading (a leaf: imports nothing of tomesd).

- `dtype_kwarg_quiet()`: newer diffusers call `from_pretrained`'s `torch_dtype` keyword `dtype` and
  warn (FutureWarning) on the old name, which 0.32 — still supported — is the only one it knows.
- `diffusers_quiet()`: diffusers' logger at ERROR level for the block (e.g. casting a randomly
  initialized model, where its "modules to keep in float32" notice does not apply).
- `loading_quiet()`: no loading bars of diffusers ("Loading pipeline components") or transformers
  ("Loading weights") for the block (the tools print one line).
- `warnings_held()`: diffusers' log records of the block are held back and given out when it ends
  normally; when it raises they are dropped (the tools report the error in one line, and diffusers'
  "Couldn't connect to the Hub ... Will try to load from local cache." lines before it said nothing more).
"""
from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def dtype_kwarg_quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def diffusers_quiet():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


@contextlib.contextmanager
def loading_quiet():
    import importlib

    bars = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            bars.append(importlib.import_module(name))
        except ImportError:
            continue
    enabled = [bar.is_progress_bar_enabled() for bar in bars]
    for bar in bars:
        bar.disable_progress_bar()
    try:
        yield
    finally:
        for bar, was in zip(bars, enabled):
            if was:
                bar.enable_progress_bar()


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def warnings_held():
    logger = logging.getLogger("diffusers")
    handlers, propagate, held = list(logger.handlers), logger.propagate, _Held()
    logger.handlers, logger.propagate = [held], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in held.records:  # only after a normal end: an exception skips this
        logger.handle(record)
