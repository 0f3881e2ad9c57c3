"""`fleet secret`: a workspace's credentials, stored encrypted (workers/secrets/).

Values go in through standard input or a prompt that does not echo, never as an
argument (a shell's history and `ps` would show it), and no command prints one.
"""

from __future__ import annotations

import sys

import typer
from pydantic import SecretStr
from rich.markup import escape
from rich.table import Table

from db import tenancy
from db.session import session_scope
from workers import workspaces
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import print_json, utc
from workers.cli.workspaces import current_name, scope
from workers.secrets import store
from workers.secrets.crypto import KeyConfigError, Keyring, generate_key, load_keyring

app = typer.Typer(help="Secrets stored encrypted per workspace: the webhook signing key "
                       "(webhook_signing_key), channel tokens (send_webhook's auth_secret).",
                  no_args_is_help=True)

NAME = typer.Argument(..., help="the secret's name, e.g. webhook_signing_key")
WORKSPACE = typer.Option(None, "--workspace", show_default=False,
                         help="the workspace it belongs to (default: fleet --workspace)")


def _say(message: str, to_err: bool = False) -> None:
    (err if to_err else out).print(message, markup=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Say why on stderr; the exit to raise."""
    _say(message, to_err=True)
    return typer.Exit(code)


def _keyring() -> Keyring:
    try:
        return load_keyring()
    except KeyConfigError as exc:
        raise _fail(str(exc)) from None


def _name(name: str) -> str:
    try:
        return store.check_name(name)
    except store.InvalidSecret as exc:
        raise _fail(f"invalid input: {exc}", 2) from None


def _workspace(workspace: str | None) -> str:
    """This command's `--workspace`, else the global one."""
    return workspace or current_name()


def _read_value(value_stdin: bool) -> SecretStr:
    if value_stdin:
        text = sys.stdin.read()
        return SecretStr(text[:-1] if text.endswith("\n") else text)
    if not sys.stdin.isatty():
        raise _fail("no terminal to prompt on: pipe the value with --value-stdin", 2)
    return SecretStr(typer.prompt("value", hide_input=True, confirmation_prompt=True))


@app.command("set")
def set_(name: str = NAME, workspace: str | None = WORKSPACE,
         value_stdin: bool = typer.Option(False, "--value-stdin",
                                          help="read the value from standard input (one "
                                               "trailing newline dropped); else a prompt "
                                               "without echo")) -> None:
    """Store a secret (encrypted under the first configured key), replacing any value."""
    name = _name(name)
    value = _read_value(value_stdin)
    try:
        store.check_value(value)
    except store.InvalidSecret as exc:
        raise _fail(f"invalid input: {exc}", 2) from None
    keyring = _keyring()
    workspace = _workspace(workspace)
    ensure_servers(broker=False)
    try:
        with scope(workspace), session_scope() as session:
            created = store.put(session, store.workspace_id(session, workspace), name, value,
                                keyring)
    except (store.UnknownWorkspace, workspaces.UnknownWorkspace) as exc:
        raise _fail(str(exc)) from None
    _say(f"{'stored' if created else 'replaced'} secret {name} of workspace {workspace} "
          f"(key {keyring.primary})")


@app.command("list")
def list_(workspace: str | None = WORKSPACE,
          as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The workspace's secrets: names, the key each is encrypted under, when set. No values."""
    workspace = _workspace(workspace)
    ensure_servers(broker=False)
    try:
        with scope(workspace), session_scope() as session:
            rows = store.list_(session, store.workspace_id(session, workspace))
    except (store.UnknownWorkspace, workspaces.UnknownWorkspace) as exc:
        raise _fail(str(exc)) from None
    try:  # keys are optional here: with them, the table says which rows are current
        primary: str | None = load_keyring().primary
    except KeyConfigError:
        primary = None
    if as_json:
        print_json([{"workspace": r.workspace, "name": r.name, "key_id": r.key_id,
                     "current_key": None if primary is None else r.key_id == primary,
                     "created_at": utc(r.created_at), "updated_at": utc(r.updated_at)}
                    for r in rows])
        return
    table = Table("name", "key id", "updated")
    for r in rows:
        mark = "" if primary is None or r.key_id == primary else " (old key)"
        table.add_row(escape(r.name), r.key_id + mark, f"{r.updated_at:%Y-%m-%d %H:%M:%S}")
    out.print(table)
    if not rows:
        err.print(f"no secrets in workspace {escape(workspace)}")


@app.command()
def delete(name: str = NAME, workspace: str | None = WORKSPACE) -> None:
    """Forget a secret (send_webhook falls back to FLEET_WEBHOOK_SECRET without one)."""
    name = _name(name)
    workspace = _workspace(workspace)
    ensure_servers(broker=False)
    try:
        with scope(workspace), session_scope() as session:
            deleted = store.delete_(session, store.workspace_id(session, workspace), name)
    except (store.UnknownWorkspace, workspaces.UnknownWorkspace) as exc:
        raise _fail(str(exc)) from None
    if not deleted:
        raise _fail(f"workspace {workspace} has no secret {name}")
    _say(f"deleted secret {name} of workspace {workspace}")


@app.command("rotate-key")
def rotate_key(batch_size: int = typer.Option(store.ROTATE_BATCH, min=1, max=10_000,
                                              help="rows read per transaction")) -> None:
    """Re-encrypt every secret of every workspace under the first configured key.

    Run it with the keys "NEW,OLD" after every worker has them; each row is rewritten in
    its own transaction, so workers keep reading. Refuses, naming the rows, when some
    row opens with none of the keys. Idempotent: a second run re-encrypts nothing.
    """
    keyring = _keyring()
    ensure_servers(broker=False)
    try:
        with tenancy.all_workspaces():  # every workspace's secrets (the owner role's rights)
            report = store.rotate(keyring, batch_size)
    except store.RotationRefused as exc:
        for row in exc.rows:
            _say(f"cannot decrypt {row.workspace}/{row.name} (encrypted under key {row.key_id})",
                 to_err=True)
        raise _fail(f"refused: {len(exc.rows)} secret(s) open with none of the configured keys "
                    f"({', '.join(keyring.key_ids)}); {exc.reencrypted} re-encrypted before "
                    "that") from None
    _say(f"re-encrypted {report.reencrypted} secret(s) under key {report.key_id}; "
          f"{report.current} already were")


@app.command("generate-key")
def generate_key_() -> None:
    """Print a new random key for FLEET_SECRET_KEYS (keep it in your secret store)."""
    typer.echo(generate_key())
