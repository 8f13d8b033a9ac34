"""The workspace contract shared by the converter (tpconv) and the runtime (tprun).

Nothing else is shared between the two programs: the layout on disk, the manifest
schema and the sharding rules all live here, declared once.
"""
from formats.errors import FormatError, ShardingError, TpDeployError

__all__ = ["FormatError", "ShardingError", "TpDeployError"]
