"""The command line: `python -m pipeline <stage> [--option value ...]`.

Every option is a field of `Config` (pipeline/config.py), where its default lives; the Makefile
passes only the variables the user set, so the defaults are written in exactly one place.
"""
import argparse
import importlib
import sys

from .config import FIELDS, Config, UserError, help_text
from .fs.escape import terminal_text
from .model import runtime

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
    raise argparse.ArgumentTypeError(f"expected 1 or 0, got {value!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, as for every other refusal, instead of argparse's usage block."""
        self.exit(2, f"error: {message}: see `python -m pipeline --help`\n")


def parser():
    p = _Parser(prog="python -m pipeline", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES))
    for name, field in FIELDS.items():  # one option per setting, its help from config.py
        option, meta = "--" + name.replace("_", "-"), name.upper()
        text = help_text(field).replace("%", "%%")  # argparse formats help with %
        if field.type is tuple:
            p.add_argument(option, nargs="*", default=field.default, metavar=meta, help=text)
        else:
            parse = _flag if field.type is bool else field.type
            p.add_argument(option, type=parse, default=field.default, metavar=meta, help=text)
    return p


def main(argv=None):
    args = vars(parser().parse_args(argv))
    stage = args.pop("stage")
    try:
        config = Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()})
        runtime.start(config.backend, config.verbose)  # before any stage imports Keras
        importlib.import_module(f"pipeline.{STAGES[stage]}").run(config)
    except UserError as error:
        # the message names files and classes, which may hold terminal escape sequences
        print(f"error: {terminal_text(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is kept; run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
