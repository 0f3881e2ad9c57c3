"""The fleet's one typed settings object, read from the environment.

Every process (worker, beat, Flower, CLI, tests) reads the same variables, so a
value set once in the environment means the same thing everywhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.service_state import read_state

if TYPE_CHECKING:
    from db.config import DatabaseConfig


class Settings(BaseSettings):
    """Fleet configuration. Unprefixed names are the conventional ones; the rest use FLEET_."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="PostgreSQL URL. Unset: the embedded server running under FLEET_HOME, if any.",
    )
    database_direct_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_DIRECT_URL",
        description="PostgreSQL itself, never a pooler: the beat's leader lock and migrations "
        "(session state). Unset: DATABASE_URL.",
    )
    database_read_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_READ_URL",
        description="A read replica for `fleet metrics show`, `fleet workflow report`, `fleet "
        "status` and the exporter's gauges (they may trail by its replay lag). Unset: "
        "DATABASE_URL.",
    )
    broker_url: str | None = Field(
        default=None,
        validation_alias="CELERY_BROKER_URL",
        description="Broker URL (redis:// or amqp://). Unset: the embedded Valkey running under "
        "FLEET_HOME, if any.",
    )
    home: Path = Field(
        default=Path(".fleet"),
        description="Folder for embedded servers' data, logs and run files.",
    )
    archive_dir: Path | None = Field(
        default=None,
        description="Where retention archives old audit partitions (default: FLEET_HOME/archive).",
    )
    broker_key_prefix: str = Field(
        default="",
        description="Redis key prefix, so several fleets or test sessions can share one Redis.",
    )
    visibility_timeout: int = Field(
        default=3600,
        description="Seconds Redis waits for an ack before redelivering a message.",
    )
    task_max_retries: int = Field(default=5, description="Retries of a transient error.")
    outage_max_retries: int = Field(
        default=100,
        description="Retries while PostgreSQL or the broker is unreachable (with the default "
        "backoff, hours) before a dead letter is tried; while even that cannot be stored the "
        "message keeps coming back, so an outage of any length leaves work queued.",
    )
    max_redeliveries: int = Field(
        default=3,
        description="Times a message may come back after its worker died running it before "
        "it is dead-lettered (poison-message guard).",
    )
    retry_backoff_base: float = Field(default=1.0, description="First retry delay, seconds.")
    retry_backoff_max: float = Field(
        default=300.0, description="Longest retry delay, seconds (kept below the visibility timeout)."
    )
    # The database layer reads these four and the URLs itself too, with the same defaults
    # (db/config.py).
    db_pool_size: int = Field(default=5, description="SQLAlchemy pool size per process.")
    db_max_overflow: int = Field(default=5, description="SQLAlchemy pool overflow per process.")
    db_statement_timeout_ms: int = Field(
        default=60_000, description="statement_timeout for fleet sessions; 0 disables it."
    )
    db_pooler: Literal["pgbouncer"] | None = Field(
        default=None,
        description="pgbouncer: DATABASE_URL and DATABASE_READ_URL go through PgBouncer in "
        "transaction mode (no prepared statements; timeout and UTC set in each transaction). "
        "Set DATABASE_DIRECT_URL too.",
    )
    trigger_cache_seconds: float = Field(
        default=2.0, description="How often a worker checks for changed trigger definitions."
    )
    webhook_secret: str | None = Field(
        default=None,
        description="HMAC-SHA256 key signing send_webhook bodies (X-Fleet-Signature) when the "
        "workspace has no stored `webhook_signing_key` secret; unsigned if neither is set.",
    )
    webhook_timeout: float = Field(default=10.0, description="send_webhook request timeout, seconds.")
    # Keys of the stored secrets (workers/secrets/): SecretStr, so no repr or log shows them.
    secret_keys: SecretStr | None = Field(
        default=None,
        description="Keys of the secrets stored encrypted per workspace (`fleet secret "
        "generate-key`), comma-separated: the first encrypts, every one decrypts (a rotation "
        "puts the new key first). Needed by the actions workers and `fleet secret` only.",
    )
    secret_key_file: Path | None = Field(
        default=None,
        description="Instead of FLEET_SECRET_KEYS: a file of those keys (one a line or "
        "comma-separated, the first encrypts; a mounted Kubernetes or Compose secret), read at "
        "each use, so a changed file needs no restart.",
    )
    outbox_confirm_seconds: int = Field(
        default=900,
        description="An outbox row published this long ago whose event has not reached the "
        "fleet (inbox or dead letters) is published again (judged only when the events "
        "queue is empty).",
    )
    stuck_step_seconds: int = Field(
        default=600,
        description="A step or operator call sent longer ago than this is re-sent by the reaper "
        "(keep it above the longest retry delay).",
    )
    step_batch_size: int = Field(
        default=50, ge=1,
        description="Step messages the workflows worker runs in one transaction at most.",
    )
    step_batch_wait_ms: float = Field(
        default=5.0, gt=0,
        description="Milliseconds a lone step message waits for others to share its transaction.",
    )
    timer_message_horizon: int = Field(
        default=60, ge=0,
        description="A timer due within this many seconds is also sent as a delayed step message "
        "(fires on time); later ones wait for the beat's sweep. 0: sweep only. At most half "
        "the visibility timeout is used.",
    )
    max_execution_steps: int = Field(
        default=50_000,
        description="Steps one execution may take before it fails as a runaway (a loop or "
        "call that never ends); 0: no bound.",
    )
    stuck_step_max_resends: int = Field(
        default=10,
        description="Times the reaper re-sends one execution's step without progress before "
        "it fails the execution (\"step re-sent N times without progress\").",
    )
    workspace: str = Field(
        default="default",
        description="The workspace the CLI works in (`fleet --workspace`) and that producers' "
        "events go to when they name none: a name made by `fleet workspace create`.",
    )
    log_level: str = Field(default="INFO", description="Root log level.")
    log_json: bool = Field(default=True, description="JSON logs (False: human-readable console).")
    flower_port: int = Field(default=5555, description="Port Flower listens on.")
    flower_basic_auth: str | None = Field(
        default=None, description="user:password[,user2:password2] for Flower, if set."
    )
    flower_broker_api: str | None = Field(
        default=None,
        description="RabbitMQ management API URL for Flower's Broker page "
        "(http://user:password@host:15672/api/); unset: no Broker page on RabbitMQ.",
    )
    metrics_port: int = Field(default=9808, description="Port `fleet exporter` serves /metrics on.")
    metrics_dir: Path | None = Field(
        default=None,
        description="Where worker processes write Prometheus counters for `fleet exporter` "
        "(default: PROMETHEUS_MULTIPROC_DIR when set, else FLEET_HOME/metrics).",
    )
    heartbeat_file: Path | None = Field(
        default=None,
        description="A worker rewrites this file every few seconds from its event loop "
        "(liveness probe: python -m workers.heartbeat check FILE 60); unset: no file.",
    )

    @field_validator("database_url", "database_direct_url", "database_read_url", "broker_url",
                     "db_pooler", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("workspace", mode="before")
    @classmethod
    def _workspace_name(cls, value: object) -> object:
        # Blank is unset, as for the URLs. The rule is the envelope's (the one
        # workers.workspaces.check_name applies), imported here, not from
        # workers.workspaces: that loads the database layer, which producers must not.
        from workers.events.envelope import WORKSPACE_NAME, WORKSPACE_NAME_RULE

        if value in (None, ""):
            return "default"
        if not isinstance(value, str) or not WORKSPACE_NAME.fullmatch(value):
            raise ValueError(f"FLEET_WORKSPACE: a workspace name is {WORKSPACE_NAME_RULE}; "
                             f"got {value!r}"[:200])
        return value

    @model_validator(mode="after")
    def _embedded_fallback(self) -> Settings:
        # Unset URLs mean "the embedded servers": take their recorded ports, so
        # `celery`, `flower` or a test started beside `fleet services start` or `fleet dev`
        # find them. Reading the record starts nothing (only `fleet dev`, `fleet demo` and
        # `fleet services` do); a set URL is never replaced.
        if self.database_url is None or self.broker_url is None:
            state = read_state(self.home)
            if state is not None:
                self.database_url = self.database_url or state.database_url
                self.broker_url = self.broker_url or state.broker_url
        return self

    @model_validator(mode="after")
    def _retries_fit_visibility(self) -> Settings:
        # A countdown longer than the visibility timeout makes Redis redeliver the
        # message while the ETA is pending: the task runs twice (celery/celery#7918).
        if self.retry_backoff_max >= self.visibility_timeout:
            raise ValueError("FLEET_RETRY_BACKOFF_MAX must be below FLEET_VISIBILITY_TIMEOUT")
        return self

    @property
    def timer_message_seconds(self) -> float:
        """The timer-message horizon in use: below half the visibility timeout, since a
        delayed message is held unacknowledged until due and Redis would deliver it again."""
        return min(float(self.timer_message_horizon), self.visibility_timeout / 2)

    @property
    def operator_retry_chain_seconds(self) -> float:
        """The longest an operator call takes with all its retries (each attempt up to the
        webhook timeout, then its backoff): the reaper does not count it lost before then."""
        delays = sum(min(self.retry_backoff_max, self.retry_backoff_base * 2**retry)
                     for retry in range(self.task_max_retries))
        return delays + (self.task_max_retries + 1) * self.webhook_timeout

    @property
    def database(self) -> DatabaseConfig:
        """What the database layer needs of these settings (db/config.py)."""
        # Imported here: producers read the settings and must not load the database layer.
        from db.config import DatabaseConfig

        return DatabaseConfig(url=self.database_url, pool_size=self.db_pool_size,
                              max_overflow=self.db_max_overflow,
                              statement_timeout_ms=self.db_statement_timeout_ms,
                              pooler=self.db_pooler, direct_url=self.database_direct_url,
                              read_url=self.database_read_url)

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver named, as SQLAlchemy wants it."""
        return self.database.sqlalchemy_url

    @property
    def direct_database_url(self) -> str | None:
        """PostgreSQL without a pooler in between: DATABASE_DIRECT_URL, else DATABASE_URL."""
        return self.database_direct_url or self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; call `get_settings.cache_clear()` after changing the env."""
    return Settings()


def reference_markdown() -> str:
    """The configuration table of the README, generated from the fields above.

    `python -m workers.settings` prints it; a test keeps the README in step.
    """
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        variable = field.validation_alias or f"FLEET_{name.upper()}"
        default = "unset" if field.default in (None, "") else field.default
        rows.append(f"| `{variable}` | {default} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())
