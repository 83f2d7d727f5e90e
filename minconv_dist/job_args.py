"""Command-line pieces the forecast, evaluation and generator jobs share: help that shows a default once (and
only a real one), the `--debug` flag that `errors.run_job` acts on, and `--dims` read into `DimNames`."""
from __future__ import annotations

import argparse
import json

from minconv_dist.data import DimNames


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, unless the help already names its default or there is
    none to show (None, False, empty), which used to give "(default: the data's first) (default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.default == {}:
            return text
        return super()._get_help_string(action)


def job_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A job's parser with `--debug` listed (`run_job` takes it off the command line before parsing)."""
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=DefaultsOnce)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (else: one line on stderr, exit code 2)")
    return p


def dims_arg(text: str) -> DimNames:
    """`--dims '{"lat": "latitude", "lon": "longitude"}'`: the store's dimension names (DimNames fields)."""
    fields = list(DimNames.__dataclass_fields__)
    try:
        value = json.loads(text)
        return DimNames(**value)
    except (json.JSONDecodeError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object with some of the keys {fields}, e.g. "
                                         '\'{"lat": "latitude", "lon": "longitude"}\'') from err
