"""`backprop users`: manage the accounts that may sign in to the web app (argon2 hashes, 0600 file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from backpropagate.errors import BackpropError, ErrorCode

ADD_HINT = "Pick a user name without spaces or ':' and a password of 8 or more characters."
FILE_OPTION = typer.Option(None, "--file", help="Users file (default: BACKPROPAGATE_HOME/users.json).")


def _path(file: Path | None) -> Path:
    from backpropagate.server.security.accounts import default_users_file

    return file or default_users_file()


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        # One line from stdin, so scripts can pipe a secret without it appearing in `ps`.
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)


def register(app: typer.Typer) -> None:
    users = typer.Typer(
        help="Manage the accounts that may sign in to the web app.",
        epilog="Example: backprop users add alice, then backprop ui --users ~/.backpropagate/users.json",
        no_args_is_help=True,
    )
    app.add_typer(users, name="users")

    @users.command(
        "add",
        epilog='Examples: backprop users add alice    |    echo "$PW" | backprop users add alice --password-stdin',
    )
    def add(
        name: str = typer.Argument(..., help="User name (no spaces or ':')."),
        password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin."),
        file: Path | None = FILE_OPTION,
    ) -> None:
        """Add an account, or set a new password for an existing one."""
        from backpropagate.server.security import accounts
        from backpropagate.server.security.passwords import hash_password

        try:
            accounts.validate_user_name(name, "user name")
            password = _read_password(password_stdin)
            accounts.validate_password(password, "password")
        except BackpropError as err:
            # The catalog's hint is about `ui --auth`; here the fix is a different name or password.
            raise BackpropError(err.code, err.message, hint=ADD_HINT) from None
        if len(password) < 8:
            raise BackpropError(
                ErrorCode.INPUT_AUTH_INVALID_SHAPE,
                "The password is shorter than 8 characters.",
                hint="Choose a longer password (a passphrase of several words works well).",
            )
        path = _path(file)
        existed = name in accounts.load_users(path)
        accounts.save_user(path, name, hash_password(password))
        print(f"{'updated' if existed else 'added'} {name} in {path}", file=sys.stderr)

    @users.command("remove", epilog="Example: backprop users remove alice")
    def remove(name: str = typer.Argument(..., help="User name."), file: Path | None = FILE_OPTION) -> None:
        """Remove an account."""
        from backpropagate.server.security import accounts

        path = _path(file)
        if not accounts.delete_user(path, name):
            raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"No user {name!r} in {path}.")
        print(f"removed {name} from {path}", file=sys.stderr)

    @users.command("list", epilog="Example: backprop users list --json")
    def list_(
        file: Path | None = FILE_OPTION,
        as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
    ) -> None:
        """List account names (never their hashes)."""
        from backpropagate.server.security import accounts

        path = _path(file)
        rows = accounts.list_users(path)
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        if not rows:
            print(f"no accounts in {path}; add one with `backprop users add NAME`", file=sys.stderr)
        for row in rows:
            print(f"{row['name']}\t{row['created']}")
