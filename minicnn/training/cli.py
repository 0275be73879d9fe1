"""What the command-line tools share: one sentence on stderr and a non-zero status for bad input."""
import argparse
import sys
import warnings

from minicnn.errors import MinicnnError

EXIT_BAD_INPUT = 2


def positive_int(text):
    """An argparse type: an int >= 1 (argparse then prints the one-line error and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def run(main, argv=None):
    """Call main(argv); a MinicnnError, a ValueError from bad arguments or an OSError (an
    unreadable path, a full disk) becomes one line on stderr and exit status 2. --debug shows
    the full traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            if not debug:               # a warning is one line too, without its source line
                warnings.showwarning = _one_line_warning
            return main(argv)
    except (MinicnnError, ValueError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:             # unreadable path, full disk...: the system's own words
        if debug:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot use{where}: {e.strerror or e}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
