"""Error types the CLI maps to exit codes.

`UsageError` (exit 2) is a mistake the user can fix: a bad path, a bad option, a locked
workspace. `CurateError` (exit 1) is a failure of the job itself. Both print one line.
"""


class CurateError(Exception):
    """The job failed; one clear line is shown (exit 1)."""

    exit_code = 1


class UsageError(CurateError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class WorkspaceLocked(UsageError):
    """Another process holds the workspace's writer lock."""
