"""Errors of a profiling run that are not the user's input (exit code 4)."""

from __future__ import annotations

from planner.errors import MeshplanError


class ProfileFailed(MeshplanError):
    """A measurement failed or a rank hung or died; the message names the rank and the step (exit 4)."""

    exit_code = 4
