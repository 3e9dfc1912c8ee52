"""`meshplan run` (being written: issue 4)."""
import typer


def run_command(plan: str = typer.Argument(..., help="Plan file")):
    """Train with a plan through torchrun and compare measured against predicted."""
    raise typer.Exit(1)
