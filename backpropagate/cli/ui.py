"""`backprop ui`: start the web app (see backpropagate/launcher for what happens)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Examples: backprop ui    |    backprop ui --host 0.0.0.0 --users ~/.backpropagate/users.json"
    )
    def ui(
        host: str | None = typer.Option(
            None,
            help="Interface to bind; non-loopback needs --auth. [default: BACKPROPAGATE_SERVER__HOST, 127.0.0.1]",
        ),
        port: int | None = typer.Option(
            None,
            min=1,
            max=65535,
            help="Port for the page, its socket and /api. [default: BACKPROPAGATE_SERVER__PORT, 7860]",
        ),
        auth: str | None = typer.Option(None, help="user:password for HTTP login."),
        auth_file: Path | None = typer.Option(None, help="File (mode 600) holding user:password."),
        users: Path | None = typer.Option(None, help="Users file (JSON, made by `backprop users add`)."),
        share: bool = typer.Option(False, help="Publish through a Cloudflare tunnel (needs --auth)."),
        no_browser: bool = typer.Option(False, "--no-browser", help="Do not open a browser."),
    ) -> None:
        """Start the web app: one port serves the page, its live socket and the API."""
        from backpropagate.launcher import LaunchOptions, launch
        from backpropagate.settings import get_settings

        server = get_settings().server  # flags win over the settings
        code = launch(
            LaunchOptions(
                host=server.host if host is None else host,
                port=server.port if port is None else port,
                auth=auth,
                auth_file=auth_file,
                users_file=users,
                share=share,
                open_browser=not no_browser,
            )
        )
        raise typer.Exit(code)
