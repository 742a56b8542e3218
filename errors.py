"""Exception types shared by the whole pack.

Every message is written for the user: it says what was expected and what was found.
The CLI maps these to exit codes (see runtime/cli.py): user errors -> 2, interruption -> 130.
"""


class KineFlowError(Exception):
    """A problem the user can fix (bad input value, wrong file, missing model). Exit code 1 at run time."""


class InputFileError(KineFlowError):
    """A file the user pointed us at is unreadable or has the wrong format. Exit code 2."""


class ModelFileError(InputFileError):
    """A checkpoint is missing, unreadable, unsafe to unpickle, incomplete, or of another family than expected
    (an unusable input file: exit code 2)."""


class InterruptedRun(Exception):
    """The user asked to stop (Ctrl-C standalone, the Cancel button inside ComfyUI). Exit code 130."""


class RankFailure(KineFlowError):
    """A run over several processes lost one of them: a rank died, hung past the collective timeout, or failed.
    Exit code 1; nothing is written."""


class StoppedByRankZero(InterruptedRun):
    """A worker of a worker pool (runtime/workers.py) stopped its sampling call because rank 0, the ComfyUI process,
    stopped at the same step (interrupted by the user, or failed); the worker stays ready for the next call."""
