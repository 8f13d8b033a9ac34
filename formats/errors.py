"""Project exceptions: user errors name the bad value, where it came from, and what is allowed."""


class TpDeployError(Exception):
    """Base for every error a user can fix; the CLIs print its message and exit non-zero."""


class FormatError(TpDeployError):
    """A file on disk (checkpoint, manifest, shard) does not match the format it claims."""


class ShardingError(TpDeployError):
    """The requested tensor-parallel degree cannot split this model."""
