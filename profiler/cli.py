"""`meshplan profile` (being written: issue 5)."""
import typer

profile_app = typer.Typer(help="Measure per-layer costs and links on the real devices.", no_args_is_help=True)


@profile_app.command("model")
def profile_model():
    """Profile per-layer time and memory."""
    raise typer.Exit(1)
