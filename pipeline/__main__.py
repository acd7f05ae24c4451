"""The command line: `python -m pipeline <stage> [--option value ...]`.

Every option is a field of `Config` (pipeline/config.py), where its default lives; the Makefile
passes only the variables the user set, and only the options given reach Config, so the defaults
are written in exactly one place and a stage can tell a setting not told from one told.

Refusals speak the user's words: run from make (which sets FROM_MAKE), a bad value names its Make
variable, and every hint `make <stage>` carries the dataset's NAME=.
"""
import argparse
import importlib
import os
import re
import sys

from .config import FIELDS, Config, UserError, help_text, hints_about, with_name
from .fs.escape import terminal_text
from .model import runtime

FROM_MAKE = "PIPELINE_FROM_MAKE"  # set by the Makefile for the CLI runs of its recipes
WHAT = {int: "a whole number", float: "a number", str: "text"}

STAGES = {
    "demo-data": "data.demo",
    "extract": "extract",
    "train-head": "train_head",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "audit": "audit",
    "predict": "predict",
    "report": "report",
    "export": "export",
    "export-model": "export_model",
    "batch": "batch",
    "reproduce": "reproduce",
}


def _flag(value):
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not 1 or 0")


def _typed(kind):
    """kind(value), or an error that says what the value is not (argparse's "invalid int
    value" names the Python type)."""
    def parse(value):
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {WHAT[kind]}") from None
    return parse


def from_make():
    return os.environ.get(FROM_MAKE) == "1"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, as for every other refusal, instead of argparse's usage block; from make,
        in its variables' words (FINETUNE_EPOCHS='two' ..., not --finetune-epochs)."""
        option = re.fullmatch(r"argument --([a-z-]+)(?:/[^:]*)?: (.*)", message)
        if option and from_make():
            name = option[1].replace("-", "_")
            default = FIELDS[name].metadata["default"] if name in FIELDS else ""
            default = int(default) if isinstance(default, bool) else default
            example = f": use e.g. {name.upper()}={default}" if default not in ("", ()) else ""
            self.exit(2, f"error: {terminal_text(f'{name.upper()}={option[2]}{example}')}\n")
        if option:
            message = f"--{option[1]} {option[2]}"
        self.exit(2, f"error: {terminal_text(message)}: see `python -m pipeline --help`\n")


def parser():
    p = _Parser(prog="python -m pipeline", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES))
    for name, field in FIELDS.items():  # one option per setting, its help from config.py
        option, meta = "--" + name.replace("_", "-"), name.upper()
        text = help_text(field).replace("%", "%%")  # argparse formats help with %
        # SUPPRESS: an option not given is left out, and Config's default (or None) applies
        if field.type is tuple:
            p.add_argument(option, nargs="*", default=argparse.SUPPRESS, metavar=meta, help=text)
        else:
            parse = _flag if field.type is bool else _typed(field.type)
            p.add_argument(option, type=parse, default=argparse.SUPPRESS, metavar=meta,
                           help=text)
    return p


def _dataset_name(args):
    """The dataset a refusal is about, also when Config refused the settings themselves."""
    data = args.get("data") or FIELDS["data"].metadata["default"]
    return args.get("name") or os.path.basename(os.path.normpath(data))


def main(argv=None):
    args = vars(parser().parse_args(argv))
    stage = args.pop("stage")
    try:
        config = Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()})
        hints_about(config.dataset_name)  # the warnings' hints name it too
        runtime.start(config.backend, config.verbose)  # before any stage imports Keras
        importlib.import_module(f"pipeline.{STAGES[stage]}").run(config)
    except UserError as error:
        # the message names files and classes, which may hold terminal escape sequences
        print(f"error: {terminal_text(with_name(str(error), _dataset_name(args)))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is kept; run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        hints_about("")  # a caller in this process (the tests) warns about no dataset of ours
    return 0


if __name__ == "__main__":
    sys.exit(main())
