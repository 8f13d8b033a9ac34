"""Project exceptions: user errors name the bad value, where it came from, and what is allowed.

Each class carries the exit code ``tpconv`` reports for it (``docs/ci.md``), so a CI job can tell a bad
flag (2) from a bad checkpoint (3), a workspace that fails verification (4) and a full disk (5); anything
else that escapes is a bug and exits 1. ``tprun`` reports every one of them as a user error (2).
"""


class TpDeployError(Exception):
    """Base for every error a user can fix; the CLIs print its message and exit non-zero."""

    exit_code = 2  # a bad flag or value on the command line


class FormatError(TpDeployError):
    """A file on disk (checkpoint, manifest, shard) does not match the format it claims."""

    exit_code = 3  # the input is bad, not the command


class ShardingError(TpDeployError):
    """The requested tensor-parallel degree cannot split this model."""


class VerificationError(TpDeployError):
    """A workspace does not match its manifest, or does not compute what its source computes."""

    exit_code = 4


class OutOfSpaceError(TpDeployError):
    """The target file system is (or would become) full."""

    exit_code = 5
