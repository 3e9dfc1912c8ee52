"""Errors meshplan reports to the user as one line and an exit code (never a traceback)."""

from __future__ import annotations


class MeshplanError(Exception):
    """A problem with what the user asked for. `exit_code` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InputError(MeshplanError):
    """Bad input: unknown preset, missing or malformed file, invalid value (exit 2)."""

    exit_code = 2


class NoFeasiblePlan(MeshplanError):
    """The search found no plan that fits in memory (exit 3)."""

    exit_code = 3


def first_pydantic_error(exc, source: str) -> InputError:
    """Turn a pydantic ValidationError into one InputError naming the field and the source."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = f"{source}: {loc}" if loc else source
    return InputError(msg, field=where)
