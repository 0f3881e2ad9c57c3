"""The keys of the stored secrets and their cipher: Fernet under a MultiFernet (`cryptography`).

Why Fernet in the fleet rather than pgcrypto: the key never reaches PostgreSQL (with
`pgp_sym_encrypt(value, key)` it travels in each statement, into `pg_stat_activity`
and statement logs), and a maintained library gives authenticated encryption
(AES-128-CBC, then HMAC-SHA256 over the token): a changed byte fails to decrypt, it
never yields other plaintext. MultiFernet decrypts with any configured key and
`rotate` re-encrypts under the first, which is the zero-downtime rotation.

Each token's plaintext starts with its context (workspace id and name), checked on
decryption, so a token copied to another workspace's or name's row fails too.

No message of this module names a key or a plaintext: a key is known by its
fingerprint (`key_id`), and errors are raised `from None` (no chained cause).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from workers.errors import TransientError
from workers.settings import Settings, get_settings

KEYS_VARIABLE = "FLEET_SECRET_KEYS"
KEY_FILE_VARIABLE = "FLEET_SECRET_KEY_FILE"
_KEY_ID_DOMAIN = b"lifecycle-fleet secret key id\x00"


class KeyConfigError(TransientError):
    """No key is configured, or a configured one is not a Fernet key.

    Transient: a worker started with the wrong configuration is replaced by a rollout
    and the call's retry then succeeds; past the retry bound the call fails its node.
    """


class UndecryptableSecret(TransientError):
    """None of the configured keys opens this stored secret (or it was tampered with).

    Transient for the same reason as `KeyConfigError`: during a rolling deploy a worker
    may still hold the old key list. Carries names and key fingerprints only.
    """

    def __init__(self, workspace: str, name: str, key_id: str, configured: Sequence[str]) -> None:
        super().__init__(f"secret {name!r} of workspace {workspace!r} cannot be decrypted with "
                         f"the configured keys ({', '.join(configured)}): it was encrypted under "
                         f"key {key_id}, or it was altered")
        self.workspace, self.name, self.key_id = workspace, name, key_id


class TokenRejected(Exception):
    """The token does not open under these keys for this context (the store names the row)."""


def generate_key() -> str:
    """A new random key (32 bytes, url-safe base64), as FLEET_SECRET_KEYS takes it."""
    return Fernet.generate_key().decode()


def key_id(key: bytes) -> str:
    """A key's fingerprint: 16 hex digits of a domain-separated SHA-256 (the key cannot be
    recovered from it: it is 256 random bits)."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key.strip()).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class Keyring:
    """The configured keys: the first encrypts, every one decrypts. Its repr names key ids."""

    key_ids: tuple[str, ...]
    _fernets: tuple[Fernet, ...]

    @classmethod
    def from_keys(cls, keys: Sequence[bytes], source: str = KEYS_VARIABLE) -> Keyring:
        unique = list(dict.fromkeys(key.strip() for key in keys if key.strip()))
        if not unique:
            raise KeyConfigError(f"{source} holds no key (`fleet secret generate-key` makes one)")
        fernets = []
        for number, key in enumerate(unique, start=1):
            try:
                fernets.append(Fernet(key))
            except ValueError:
                raise KeyConfigError(f"key {number} of {source} is not a Fernet key (32 url-safe "
                                     "base64-encoded bytes: `fleet secret generate-key`)") from None
        return cls(tuple(key_id(key) for key in unique), tuple(fernets))

    def __repr__(self) -> str:
        return f"Keyring(key_ids={self.key_ids!r})"

    @property
    def primary(self) -> str:
        """The id of the key that encrypts."""
        return self.key_ids[0]

    def encrypt(self, context: str, value: SecretStr) -> bytes:
        """A token of `value` bound to `context`, under the first key."""
        return self._fernets[0].encrypt(_bound(context) + value.get_secret_value().encode())

    def decrypt(self, context: str, token: bytes, key_hint: str | None = None) -> SecretStr:
        """The value of `token`, or `TokenRejected`."""
        payload = self._open(token, key_hint)
        prefix = _bound(context)
        if not payload.startswith(prefix):  # a token moved from another row
            raise TokenRejected()
        return SecretStr(payload[len(prefix):].decode())

    def rotate(self, context: str, token: bytes, key_hint: str | None = None) -> bytes:
        """`token` re-encrypted under the first key (checked to open for `context` first)."""
        self.decrypt(context, token, key_hint)
        return MultiFernet(self._fernets).rotate(token)

    def _open(self, token: bytes, key_hint: str | None) -> bytes:
        # The row's own key first (one HMAC check), then every key, as MultiFernet does.
        if key_hint in self.key_ids:
            try:
                return self._fernets[self.key_ids.index(key_hint)].decrypt(token)
            except InvalidToken:
                pass
        try:
            return MultiFernet(self._fernets).decrypt(token)
        except InvalidToken:
            raise TokenRejected() from None


def _bound(context: str) -> bytes:
    return context.encode() + b"\n"


def load_keyring(settings: Settings | None = None) -> Keyring:
    """The keys of FLEET_SECRET_KEYS (comma-separated) or FLEET_SECRET_KEY_FILE (one a line or
    comma-separated, `#` comments), read now: a key file changed in place (a Kubernetes
    secret) needs no restart."""
    settings = settings or get_settings()
    if settings.secret_keys is not None and settings.secret_key_file is not None:
        raise KeyConfigError(f"set {KEYS_VARIABLE} or {KEY_FILE_VARIABLE}, not both")
    if settings.secret_keys is not None:
        text = settings.secret_keys.get_secret_value()
        return Keyring.from_keys([k.encode() for k in text.split(",")], KEYS_VARIABLE)
    if settings.secret_key_file is not None:
        path = settings.secret_key_file
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise KeyConfigError(f"{KEY_FILE_VARIABLE} {path}: {exc.strerror}") from None
        keys = [key for line in lines if not line.lstrip().startswith(b"#")
                for key in line.split(b",")]
        return Keyring.from_keys(keys, f"{KEY_FILE_VARIABLE} {path}")
    raise KeyConfigError(f"no key for the stored secrets: set {KEYS_VARIABLE} or "
                         f"{KEY_FILE_VARIABLE} (`fleet secret generate-key` makes one)")
