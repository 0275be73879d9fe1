"""What the command-line tools share: one sentence on stderr and exit status 2 for bad input,
a traceback and exit status 70 for a bug."""
import argparse
import os
import signal
import sys
import traceback
import warnings

import minicnn
from minicnn.errors import MinicnnError
from minicnn.parallel import mpi

EXIT_BAD_INPUT = 2
EXIT_BUG = 70           # sysexits.h EX_SOFTWARE: an internal error, not the user's


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
    """_run(main, argv): the exit status. Under mpiexec (minicnn.parallel.mpi), a process that
    ends with an error leaves at once, and the launcher ends the others, which may be waiting
    for it in a sum."""
    status = _run(main, argv)
    if status:
        mpi.leave_after_error(status)
    return status


def _run(main, argv=None):
    """Call main(argv); what it raises becomes lines on stderr and an exit status:

        MinicnnError (the tools' bad-input errors)     error: SENTENCE                status 2
        OSError that names a file (unreadable path,    error: FILE: REASON            status 2
          full disk: the user's situation)
        MemoryError                                    error: Out of memory (...)...  status 2
        BrokenPipeError (a reader that went away)      nothing                        status 141
        anything else: a bug in minicnn                the traceback, then            status 70
                                                       error: this is a bug in minicnn VERSION...

    Argparse's own errors exit 2 by themselves. With --debug, the status-2 cases raise (the
    traceback, status 1) instead. 70 is sysexits.h's EX_SOFTWARE, "internal software error"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            if not debug:               # a warning is one line too, without its source line
                warnings.showwarning = _one_line_warning
            return main(argv)
    except MinicnnError as e:
        if debug:
            raise
        if not getattr(e, "quiet", False):       # quiet: another process says it (mpiexec)
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:          # the reader went away (predict ... | head): not an error
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except OSError as e:
        if e.filename is None:      # a failure that names no file: ours to explain
            return _bug()
        if debug:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError as e:         # NumPy says how much it could not allocate
        if debug:
            raise
        print(f"error: Out of memory{f' ({e})' if str(e) else ''}: ask for less (a smaller "
              f"batch or image size), or free memory.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        return _bug()


def _quiet_stdout():
    """Point stdout at /dev/null, so Python's flush at exit does not fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _bug():
    """The traceback of the exception being handled, then a line that says it is a bug."""
    traceback.print_exc()
    print(f"error: this is a bug in minicnn {minicnn.__version__}, not a problem with your "
          f"input: please report it with the traceback above and the command you ran.",
          file=sys.stderr)
    return EXIT_BUG
