"""Pieces the command-line tools (`tomesd.bench`, `tomesd.quality`) share.

- argument types for argparse: `parse_value`, `values`, `assignment` (KEY=V1,V2), `setting`
  (KEY=V,KEY=V), `comma_list`, `bounded` (`positive`, `positive_number`);
- the settings grid: `patch_keywords` (what a grid may vary), `grid_settings` (the product of the
  axes), `setting_label`, `check_settings` (apply every setting once, before any work);
- output: `fmt` (a table cell), `align` (an aligned text table), `environment` (versions, device),
  `write_json`, `write_csv`;
- optional dependencies: `available` (tests monkeypatch it to play a missing module), `progress`;
- `default_device`, `cuda_problem`, `error_line` (an exception in one line);
- `Parser`: an argparse.ArgumentParser whose errors are one line (no usage block before them).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import itertools
import json
import platform
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

DEFAULTS_LABEL = "apply_patch defaults"  # how an empty setting is named in messages


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose error is one line on stderr, `prog: error: message`, exit status 2
    (argparse's own prints the usage block first; --help still prints it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types ----

def parse_value(text: str) -> Any:
    """'true'/'false' → bool, 'none' → None, integers, floats, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", "default"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def values(kind=None) -> Callable[[str], tuple]:
    """argparse type: a comma-separated list of values (parse_value), all of `kind` (bool, float,
    int or None for any) when given."""

    def parse(text: str) -> tuple:
        parts = [v for v in text.split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        out = tuple(parse_value(v) for v in parts)
        if kind is bool and not all(isinstance(v, bool) for v in out):
            raise argparse.ArgumentTypeError(f"expected true/false values, got {text!r}")
        if kind is float and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in out):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        if kind is int and not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in out):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers (or none), got {text!r}")
        return out

    return parse


def _key(text: str) -> str:
    return text.strip().replace("-", "_")


def assignment(text: str) -> Tuple[str, tuple]:
    """argparse type: one grid axis, 'plan_every=1,2' → ("plan_every", (1, 2))."""
    key, sep, rest = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=V1[,V2...], got {text!r}")
    return _key(key), values()(rest)


def setting(text: str) -> Dict[str, Any]:
    """argparse type: one setting, 'mode=kv,prop_attn=false' → {"mode": "kv", "prop_attn": False}."""
    params: Dict[str, Any] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        if _key(key) in params:
            raise argparse.ArgumentTypeError(f"{_key(key)} given twice in {text!r}")
        params[_key(key)] = parse_value(value)
    if not params:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return params


def comma_list(kind) -> Callable[[str], tuple]:
    """argparse type: comma-separated values of `kind` (int or float); their ranges are the caller's."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {noun}, got {text!r}") from None

    return parse


def bounded(kind, noun: str, ok: Callable[[Any], bool], bound: str) -> Callable[[str], Any]:
    """argparse type: a `kind` (int, float) for which ok(value) holds; messages "expected NOUN" and
    "must be BOUND"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


positive = bounded(int, "an integer", lambda v: v >= 1, "≥ 1")  # argparse type: an integer ≥ 1
positive_number = bounded(float, "a number such as 1.5", lambda v: v > 0, "> 0")  # argparse type: a number > 0


# ---- the settings grid ----

def patch_keywords(exclude: Iterable[str] = ("model",)) -> Tuple[str, ...]:
    """The keyword arguments of tomesd.apply_patch, less `exclude`: what a grid may vary."""
    import tomesd

    return tuple(name for name in inspect.signature(tomesd.apply_patch).parameters if name not in set(exclude))


def grid_settings(grid: Dict[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """apply_patch keyword dicts: the product of the grid's value lists, in the order given (the last
    key varies fastest). A value that is a dict contributes all its keywords (a sub-layer set, a
    whole setting)."""
    keys = list(grid)
    out = []
    for chosen in itertools.product(*(grid[k] for k in keys)):
        params: Dict[str, Any] = {}
        for key, value in zip(keys, chosen):
            params.update(value if isinstance(value, dict) else {key: value})
        out.append(params)
    return out


def setting_label(params: Dict[str, Any]) -> str:
    """'mode=kv prop_attn=False' ('' for apply_patch's defaults)."""
    return " ".join(f"{k}={v}" for k, v in params.items())


def add_axes(parser: argparse.ArgumentParser, grid: Dict[str, tuple], assignments: Iterable[Tuple[str, tuple]],
             given_by: Optional[Dict[str, str]] = None) -> Dict[str, tuple]:
    """Add each `--set KEY=V1,V2` axis to `grid` (in place, returned); parser.error when KEY is an axis
    already: given by another --set, or by the option given_by[KEY] names."""
    given_by = dict(given_by or {})
    for key, vals in assignments:
        if key in grid:
            parser.error(f"--set {key}: already given by {given_by.get(key, f'another --set {key}')}")
        grid[key] = vals
        given_by[key] = f"another --set {key}"
    return grid


def check_settings(model, settings: Iterable[Dict[str, Any]], base: Optional[Dict[str, Any]] = None,
                   label: Callable[[Dict[str, Any]], str] = setting_label) -> None:
    """Apply and remove every setting (apply_patch keywords over `base`) on `model` once, before any
    work: a bad value, or one this model refuses, fails now with apply_patch's own message
    (ValueError / TypeError), prefixed by "setting LABEL: " (DEFAULTS_LABEL for an empty one)."""
    import tomesd

    try:
        for params in settings:
            try:
                tomesd.apply_patch(model, **{**(base or {}), **params})
            except (ValueError, TypeError) as error:
                raise type(error)(f"setting {label(params) or DEFAULTS_LABEL}: {error}") from None
    finally:
        tomesd.remove_patch(model)


# ---- output ----

def fmt(value, spec: str, unit: str = "") -> str:
    """A table cell: '-' for None, else value in `spec` (inf as 'inf') followed by `unit`."""
    return "-" if value is None else format(value, spec) + unit


def align(lines: Sequence[Sequence[str]], left: Tuple[int, ...] = (0,)) -> List[str]:
    """Rows of cells (the first the header) as aligned text lines, a dashed line under the header;
    the columns in `left` are left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def environment(device: str) -> Dict[str, Any]:
    """Versions (tomesd, torch, CUDA, diffusers, python), platform, device, GPU name, CPU and threads."""
    import diffusers
    import torch

    import tomesd

    return dict(
        tomesd=tomesd.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
        python=platform.python_version(), platform=platform.platform(), cuda=torch.version.cuda, device=device,
        gpu=torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None,
        cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
    )


def write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


def write_csv(path: str, rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
    """One line per row (columns: the rows' keys in order of appearance), "params" as JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) if columns is None else list(columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**row, "params": json.dumps(row.get("params"))} for row in rows)


# ---- optional dependencies, devices ----

def available(module: str) -> bool:
    """Whether an optional dependency can be imported (tests monkeypatch this to play a missing one)."""
    return importlib.util.find_spec(module) is not None


class _NoBar(list):
    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(items: Sequence[Any], desc: str, unit: str, show: bool = True):
    """A tqdm bar over `items` on stderr when `show` and tqdm is installed, else the items in a list
    with the same set_postfix_str / close methods doing nothing."""
    if not (show and available("tqdm")):
        return _NoBar(items)
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr)


# a sentence sending the reader to a traceback ("Please check out the root cause in the stacktrace above."),
# which a one-line report does not print
_POINTS_ABOVE = re.compile(r"\s*[^.]*\b(?:stack ?trace|traceback)s?\b[^.]*\babove\b[^.]*\.?", re.IGNORECASE)


def error_line(error: BaseException) -> str:
    """'TypeName: first line of the message', for one-line error reports. A sentence pointing to "the
    stacktrace above" is replaced by that cause in one line (diffusers' loading errors point there)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if _POINTS_ABOVE.search(text):
        text = _POINTS_ABOVE.sub("", text).rstrip()
        cause = error.__cause__ or error.__context__
        if cause is not None:
            text += f" (cause: {error_line(cause)})"
    return f"{type(error).__name__}: {text}"


def default_device(device: Optional[str] = None) -> str:
    """`device`, or cuda when available, else cpu."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_problem(device: Optional[str]) -> str:
    """One line if `device` asks for CUDA where none is available, else ""."""
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"--device {device}: no CUDA device is available"
    return ""
