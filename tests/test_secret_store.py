"""Secrets stored encrypted per workspace (workers/secrets/): the cipher, the table, rotation
and `fleet secret`, on the session's migrated PostgreSQL.

The rotation tests follow the documented procedure: keys "new,old" read what "old" wrote,
`rotate-key` moves every row to "new", then "new" alone reads everything and "old" alone
reads nothing (with an error that names the row, never its value or a key).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import text

from db import tenancy
from db.models import DEFAULT_WORKSPACE, DEFAULT_WORKSPACE_ID
from db.session import session_scope
from tests.helpers import ROOT, worker_env
from workers.secrets import store
from workers.secrets.crypto import (
    KeyConfigError,
    Keyring,
    UndecryptableSecret,
    generate_key,
    key_id,
    load_keyring,
)
from workers.settings import Settings, get_settings

pytestmark = pytest.mark.servers

OLD, NEW, OTHER = (Fernet.generate_key() for _ in range(3))
VALUE = f"hmac-key-{uuid.uuid4().hex}-\u00e9\u4e2d"  # not ASCII: stored as UTF-8


def keys(*which: bytes) -> Keyring:
    return Keyring.from_keys(list(which))


def _empty() -> None:
    with session_scope() as session:
        session.execute(text("DELETE FROM workspace_secrets"))
        session.execute(text("DELETE FROM workspaces WHERE name LIKE 'secret-test-%'"))


@pytest.fixture(autouse=True)
def _empty_table() -> Iterator[None]:
    """Rotation walks every row: each test starts with none, and leaves none (a stored
    webhook_signing_key would be used by the other tests' webhooks)."""
    _empty()
    yield
    _empty()


def new_workspace() -> tuple[uuid.UUID, str]:
    """A second workspace (its real creation comes with `fleet workspace create`)."""
    name = f"secret-test-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        return session.execute(text("INSERT INTO workspaces (name) VALUES (:n) RETURNING id"),
                               {"n": name}).scalar_one(), name


def put(name: str, value: str, keyring: Keyring,
        workspace: uuid.UUID = DEFAULT_WORKSPACE_ID) -> bool:
    with tenancy.workspace(workspace), session_scope() as session:
        return store.put(session, workspace, name, SecretStr(value), keyring)


def get(name: str, keyring: Keyring, workspace: uuid.UUID = DEFAULT_WORKSPACE_ID) -> str | None:
    with tenancy.workspace(workspace), session_scope() as session:
        found = store.get(session, workspace, name, keyring)
    return None if found is None else found.get_secret_value()


def rows() -> list[tuple[str, str, bytes]]:
    with tenancy.all_workspaces(), session_scope() as session:  # every workspace's
        return [(r.name, r.key_id, bytes(r.ciphertext)) for r in session.execute(text(
            "SELECT name, key_id, ciphertext FROM workspace_secrets ORDER BY name"))]


def assert_clean(message: str, *secrets: str | bytes) -> None:
    for secret in secrets:
        shown = secret.decode() if isinstance(secret, bytes) else secret
        assert shown not in message, f"{shown[:6]}… in {message!r}"


# --------------------------------------------------------------------------- cipher and table


def test_the_default_workspace_exists_with_its_fixed_id() -> None:
    with session_scope() as session:
        assert store.workspace_id(session) == DEFAULT_WORKSPACE_ID
        assert store.workspace_id(session, DEFAULT_WORKSPACE) == DEFAULT_WORKSPACE_ID
        with pytest.raises(store.UnknownWorkspace):
            store.workspace_id(session, "no-such-workspace")


def test_a_value_round_trips_and_is_stored_only_as_ciphertext() -> None:
    ring = keys(OLD)
    assert put("webhook_signing_key", VALUE, ring) is True
    assert get("webhook_signing_key", ring) == VALUE
    [(name, kid, token)] = rows()
    assert name == "webhook_signing_key" and kid == key_id(OLD) == ring.primary
    assert VALUE.encode() not in token and OLD not in token
    assert len(kid) == 16 and kid not in OLD.decode()  # a fingerprint, not a piece of the key
    assert put("webhook_signing_key", "second value", ring) is False  # replaced
    assert get("webhook_signing_key", ring) == "second value"
    assert get("not_stored", ring) is None
    with session_scope() as session:  # no row: no key needed at all
        assert store.get(session, DEFAULT_WORKSPACE_ID, "not_stored",
                         Keyring.from_keys([OTHER])) is None


def test_list_shows_names_and_key_ids_never_values() -> None:
    put("b_token", VALUE, keys(OLD))
    put("a_token", VALUE + "x", keys(NEW))
    with session_scope() as session:
        listed = store.list_(session, DEFAULT_WORKSPACE_ID)
    assert [(s.workspace, s.name, s.key_id) for s in listed] == [
        (DEFAULT_WORKSPACE, "a_token", key_id(NEW)), (DEFAULT_WORKSPACE, "b_token", key_id(OLD))]
    assert_clean(repr(listed), VALUE)


def test_a_changed_byte_fails_to_decrypt_with_a_message_naming_the_row_only() -> None:
    ring = keys(OLD)
    put("webhook_signing_key", VALUE, ring)
    with session_scope() as session:  # flip one bit in the middle of the token
        session.execute(text(
            "UPDATE workspace_secrets SET ciphertext = set_byte(ciphertext, "
            "length(ciphertext) / 2, get_byte(ciphertext, length(ciphertext) / 2) # 1)"))
    with pytest.raises(UndecryptableSecret) as failed:
        get("webhook_signing_key", ring)
    message = f"{failed.value} {failed.value!r} {failed.value.__cause__!r} {failed.value.__context__!r}"
    assert "'webhook_signing_key' of workspace 'default'" in message, message
    assert key_id(OLD) in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    assert_clean(message, VALUE, OLD)


def test_a_secret_of_one_workspace_is_not_returned_for_another() -> None:
    ring = keys(OLD)
    other, other_name = new_workspace()
    put("crm_token", VALUE, ring, workspace=DEFAULT_WORKSPACE_ID)
    assert get("crm_token", ring, workspace=other) is None
    with tenancy.workspace(other), session_scope() as session:
        assert store.list_(session, other) == []
    put("crm_token", "the other workspace's", ring, workspace=other)
    assert get("crm_token", ring, workspace=other) == "the other workspace's"
    assert get("crm_token", ring, workspace=DEFAULT_WORKSPACE_ID) == VALUE
    # A ciphertext copied into the other workspace's row does not open there: each token
    # is bound to its workspace and name (copied by the owner, who sees both).
    with tenancy.all_workspaces(), session_scope() as session:
        session.execute(text(
            "UPDATE workspace_secrets SET ciphertext = (SELECT ciphertext FROM workspace_secrets "
            "WHERE workspace_id = :d AND name = 'crm_token') WHERE workspace_id = :o"),
            {"d": DEFAULT_WORKSPACE_ID, "o": other})
    with pytest.raises(UndecryptableSecret, match=f"'crm_token' of workspace '{other_name}'"):
        get("crm_token", ring, workspace=other)


def test_names_and_values_are_checked_before_anything_is_stored() -> None:
    with pytest.raises(store.InvalidSecret, match="secret name"):
        put("Bad Name", VALUE, keys(OLD))
    with pytest.raises(store.InvalidSecret, match="empty"):
        put("empty", "", keys(OLD))
    with pytest.raises(store.InvalidSecret, match="Unicode") as failed:
        put("surrogate", "abc\ud800", keys(OLD))
    assert "abc" not in str(failed.value)
    assert rows() == []


def test_keys_come_from_the_environment_or_a_file_and_never_show(tmp_path: Path) -> None:
    folder = tmp_path
    from_env = load_keyring(Settings(secret_keys=f" {NEW.decode()} ,{OLD.decode()}"))
    assert from_env.key_ids == (key_id(NEW), key_id(OLD)) and from_env.primary == key_id(NEW)
    key_file = folder / "keys"
    key_file.write_text(f"# rotated 2026-12\n{NEW.decode()}\n\n{OLD.decode()}\n")
    from_file = load_keyring(Settings(secret_key_file=key_file))
    assert from_file.key_ids == from_env.key_ids
    key_file.write_text(f"{NEW.decode()},{OLD.decode()}")  # a Compose secret of the variable
    assert load_keyring(Settings(secret_key_file=key_file)).key_ids == from_env.key_ids
    settings = Settings(secret_keys=f"{NEW.decode()},{OLD.decode()}")
    for shown in (repr(settings), str(settings), repr(from_env), str(settings.model_dump())):
        assert_clean(shown, NEW, OLD)
    failures = {
        "none": Settings(),
        "both": Settings(secret_keys=NEW.decode(), secret_key_file=key_file),
        "malformed": Settings(secret_keys=f"{NEW.decode()},not-a-key-{OLD.decode()[:20]}"),
        "empty": Settings(secret_keys=" , "),
        "missing file": Settings(secret_key_file=folder / "absent"),
    }
    for why, bad in failures.items():
        with pytest.raises(KeyConfigError) as failed:
            load_keyring(bad)
        assert_clean(str(failed.value), NEW, OLD, OLD.decode()[:20])
        assert failed.value.__cause__ is None, why
    with pytest.raises(KeyConfigError, match="key 2 of FLEET_SECRET_KEYS is not a Fernet key"):
        load_keyring(failures["malformed"])
    assert Fernet(generate_key().encode())  # a key generate-key prints is a Fernet key


# --------------------------------------------------------------------------- rotation


def test_rotation_without_downtime() -> None:
    other, _ = new_workspace()
    values = {f"token_{n}": f"value-{n}-{uuid.uuid4().hex}" for n in range(7)}
    for n, (name, value) in enumerate(values.items()):  # written under the old key alone
        put(name, value, keys(OLD), workspace=other if n % 2 else DEFAULT_WORKSPACE_ID)
    where = {name: other if n % 2 else DEFAULT_WORKSPACE_ID for n, name in enumerate(values)}

    # 1. Every worker gets "new,old": encrypts under new, still reads what old wrote.
    both = keys(NEW, OLD)
    assert all(get(name, both, where[name]) == value for name, value in values.items())
    put("written_during", "after the deploy", both)
    assert {kid for _, kid, _ in rows()} == {key_id(OLD), key_id(NEW)}

    # 2. rotate-key, in batches of 3: every row ends under new; a second run changes nothing.
    report = store.rotate(both, batch_size=3)
    assert (report.reencrypted, report.current, report.key_id) == (7, 1, key_id(NEW))
    assert {kid for _, kid, _ in rows()} == {key_id(NEW)}
    again = store.rotate(both, batch_size=3)
    assert (again.reencrypted, again.current) == (0, 8)

    # 3. "new" alone reads every secret.
    only_new = keys(NEW)
    assert all(get(name, only_new, where[name]) == value for name, value in values.items())
    assert get("written_during", only_new) == "after the deploy"

    # "old" alone no longer can: a clear error, no value, no key.
    with pytest.raises(UndecryptableSecret) as failed:
        get("token_0", keys(OLD))
    message = str(failed.value)
    assert "'token_0' of workspace 'default'" in message
    assert f"({key_id(OLD)})" in message and f"under key {key_id(NEW)}" in message
    assert_clean(message + repr(failed.value), values["token_0"], OLD, NEW)


def test_rotation_refuses_when_a_row_opens_with_no_configured_key() -> None:
    put("fine", VALUE, keys(OLD))
    put("stranded", VALUE, keys(OTHER))
    before = rows()
    with pytest.raises(store.RotationRefused) as refused:
        store.rotate(keys(NEW, OLD))
    assert [(r.workspace, r.name, r.key_id) for r in refused.value.rows] == [
        (DEFAULT_WORKSPACE, "stranded", key_id(OTHER))]
    assert "default/stranded" in str(refused.value)
    assert_clean(str(refused.value), VALUE, OLD, NEW, OTHER)
    assert rows() == before  # nothing was re-encrypted


def test_readers_keep_working_while_rows_are_rotated() -> None:
    values = {f"t{n:03}": f"v{n}" for n in range(150)}
    with session_scope() as session:
        for name, value in values.items():
            store.put(session, DEFAULT_WORKSPACE_ID, name, SecretStr(value), keys(OLD))
    both, errors, reads = keys(NEW, OLD), [], [0]
    stop = threading.Event()

    def reader() -> None:
        names = list(values)
        while not stop.is_set():
            name = names[reads[0] % len(names)]
            try:
                assert get(name, both) == values[name]
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        report = store.rotate(both, batch_size=20)
    finally:
        stop.set()
        thread.join()
    assert report.reencrypted == 150 and not errors, errors[:3]
    assert reads[0] > 10, reads
    assert {kid for _, kid, _ in rows()} == {key_id(NEW)}


# --------------------------------------------------------------------------- the CLI


def fleet(*args: str, keys_value: str | None, stdin: str | None = None,
          ) -> subprocess.CompletedProcess[str]:
    env = worker_env()
    env.pop("FLEET_SECRET_KEYS", None)
    env.pop("FLEET_SECRET_KEY_FILE", None)
    if keys_value is not None:
        env["FLEET_SECRET_KEYS"] = keys_value
    return subprocess.run([sys.executable, "-m", "workers.cli.main", "secret", *args], env=env,
                          cwd=ROOT, input=stdin if stdin is not None else "", text=True,
                          capture_output=True, timeout=120)


def test_the_cli_sets_lists_rotates_and_never_prints_a_value_or_key() -> None:
    old, new = OLD.decode(), NEW.decode()
    generated = fleet("generate-key", keys_value=None)
    assert generated.returncode == 0 and Fernet(generated.stdout.strip().encode())

    done = fleet("set", "webhook_signing_key", "--value-stdin", keys_value=old, stdin=VALUE + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"stored secret webhook_signing_key of workspace default "
                                   f"(key {key_id(OLD)})")
    assert get("webhook_signing_key", keys(OLD)) == VALUE  # the trailing newline dropped
    assert fleet("set", "crm_token", "--value-stdin", keys_value=old,
                 stdin="tok").returncode == 0
    replaced = fleet("set", "crm_token", "--value-stdin", keys_value=old, stdin="tok2")
    assert replaced.stdout.startswith("replaced secret crm_token"), replaced.stdout

    listed = fleet("list", keys_value=f"{new},{old}")
    assert listed.returncode == 0, listed.stderr
    assert "webhook_signing_key" in listed.stdout and f"{key_id(OLD)} (old key)" in listed.stdout
    as_json = fleet("list", "--json", keys_value=None)  # no keys needed to list
    assert [(r["name"], r["key_id"], r["current_key"]) for r in _json(as_json.stdout)] == [
        ("crm_token", key_id(OLD), None), ("webhook_signing_key", key_id(OLD), None)]

    rotated = fleet("rotate-key", "--batch-size", "1", keys_value=f"{new},{old}")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.strip() == (f"re-encrypted 2 secret(s) under key {key_id(NEW)}; "
                                      "0 already were")
    again = fleet("rotate-key", keys_value=f"{new},{old}")
    assert again.stdout.strip().startswith("re-encrypted 0 secret(s)") and "2 already" in again.stdout
    assert get("crm_token", keys(NEW)) == "tok2"

    deleted = fleet("delete", "crm_token", keys_value=None)
    assert deleted.returncode == 0 and get("crm_token", keys(NEW)) is None
    for run in (generated, done, replaced, listed, as_json, rotated, again, deleted):
        assert_clean(run.stdout + run.stderr, VALUE, "tok2", old, new)


def _json(output: str) -> list[dict[str, object]]:
    import json

    value = json.loads(output)
    assert isinstance(value, list)
    return value


def test_the_cli_refuses_clearly() -> None:
    old = OLD.decode()
    no_keys = fleet("set", "webhook_signing_key", "--value-stdin", keys_value=None, stdin=VALUE)
    assert no_keys.returncode == 1 and "FLEET_SECRET_KEYS" in no_keys.stderr, no_keys.stderr
    bad_name = fleet("set", "Bad/Name", "--value-stdin", keys_value=old, stdin=VALUE)
    assert bad_name.returncode == 2 and "invalid input: secret name" in bad_name.stderr
    no_tty = fleet("set", "webhook_signing_key", keys_value=old, stdin=VALUE)
    assert no_tty.returncode == 2 and "--value-stdin" in no_tty.stderr
    unknown = fleet("list", "--workspace", "nowhere", keys_value=None)
    assert unknown.returncode == 1 and "no workspace named 'nowhere'" in unknown.stderr
    put("stranded", VALUE, keys(OTHER))
    refused = fleet("rotate-key", keys_value=f"{NEW.decode()},{old}")
    assert refused.returncode == 1
    assert f"cannot decrypt default/stranded (encrypted under key {key_id(OTHER)})" in refused.stderr
    assert "refused: 1 secret(s)" in refused.stderr
    assert rows()[0][1] == key_id(OTHER)
    for run in (no_keys, bad_name, no_tty, unknown, refused):
        assert_clean(run.stdout + run.stderr, VALUE, old, OTHER)


def test_the_prompt_does_not_echo_the_value() -> None:
    """On a terminal `fleet secret set NAME` asks twice without echo (getpass)."""
    import pty
    import select

    master, slave = pty.openpty()
    env = worker_env(FLEET_SECRET_KEYS=OLD.decode())
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli.main", "secret", "set",
                             "prompted"], env=env, cwd=ROOT, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    seen, asked = b"", 0
    try:
        # "value:", then "Repeat for confirmation:", each followed by the " " that getpass
        # writes once it has turned echo off: only then is the answer typed.
        for _ in range(2):
            while not seen[asked:].endswith(b": "):
                ready, _, _ = select.select([master], [], [], 60)
                assert ready, seen
                seen += os.read(master, 4096)
            os.write(master, b"prompted-value-123\n")
            asked = len(seen)
        assert proc.wait(timeout=60) == 0
        while select.select([master], [], [], 0.5)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert b"prompted-value-123" not in seen, seen
    assert b"stored secret prompted" in seen, seen
    assert get("prompted", keys(OLD)) == "prompted-value-123"


def test_get_settings_reads_the_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_SECRET_KEYS", f"{NEW.decode()},{OLD.decode()}")
    get_settings.cache_clear()
    try:
        assert load_keyring().key_ids == (key_id(NEW), key_id(OLD))
        put("from_env", VALUE, load_keyring())
        with session_scope() as session:  # store.get loads the keys itself
            assert store.get(session, DEFAULT_WORKSPACE_ID, "from_env") == SecretStr(VALUE)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
