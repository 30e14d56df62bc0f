"""The local SQL mirror: schema, migrations, and the transactional apply()."""

from syncd.mirror.apply import ApplyResult, DeleteGuard, HeldDeletion, Mirror
from syncd.mirror.database import Database

__all__ = ["ApplyResult", "Database", "DeleteGuard", "HeldDeletion", "Mirror"]
