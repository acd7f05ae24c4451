"""What the pipeline says to its user: a refusal (UserError, one line), a notice that must not be
missed (warn), and the two rules every such line follows: text read back from files is made
safe for the terminal (terminal_text), and a hint to run a make target that acts on one dataset
names that dataset (with_name).

The base of the package, beside config: imports nothing of it.
"""
import re
import shlex
import unicodedata


class UserError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits non-zero."""


def warn(message):
    """A notice that must not be missed (random weights, a model passed over): one line that
    stands out from progress and results, on stdout beside the results it qualifies. It names
    files, classes and notices read back from files: shown through escape.terminal_text."""
    print(f"!!! {terminal_text(with_name(message, _HINTS_ABOUT[0]))}", flush=True)


# Bidirectional controls reorder what a terminal shows (a name can display as another)
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def terminal_text(text):
    """Text for one printed line: control characters (ESC, BEL, C1, newlines, ...), bidi controls
    and lone surrogates (bytes of a name that is not UTF-8) are shown as \\x1b, \\u202e, \\xe9...,
    so no OSC or CSI sequence (clipboard writes, window titles, cursor moves) reaches the terminal
    and the user can still tell which file is meant. The terminal's escaping function
    (escape.terminal_text), here because `warn` prints through it."""
    return "".join(_terminal_char(c) for c in str(text))


def _terminal_char(c):
    if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode keeps it
        return f"\\x{ord(c) - 0xDC00:02x}"
    if unicodedata.category(c) in ("Cc", "Cs") or c in _BIDI:
        return c.encode("unicode_escape").decode("ascii") if ord(c) < 0xD800 else \
            f"\\u{ord(c):04x}"
    return c


# the make targets that act on one dataset, so that a hint to run one needs its NAME
NAMED_TARGETS = ("extract", "train-head", "finetune", "evaluate", "predict", "audit", "report",
                 "export")
_HINTS_ABOUT = [""]  # the dataset of the CLI's run (hints_about), for warn's hints


def hints_about(name):
    """Name the dataset that the CLI's run is about: warn's hints carry its NAME= from now on."""
    _HINTS_ABOUT[0] = name


def with_name(message, name):
    """`message` with NAME=<name> in every hint to run a make target that acts on one dataset
    and does not name it yet: "run `make train-head`" -> "run `make train-head NAME=pets`"."""
    def named(hint):
        target, rest = hint[1], hint[2]
        if target not in NAMED_TARGETS or "NAME=" in rest or not name:
            return hint[0]
        return f"`make {target} NAME={shlex.quote(name)}{rest}`"
    return re.sub(r"`make ([a-z-]+)([^`]*)`", named, message)
