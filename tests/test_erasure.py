"""Erasure and export of a user (`fleet user forget|export`) on a real database.

Two users get data in every table the fleet keeps about a user through the real code
paths (ingest: events, identify, consent, trigger evaluations, starts, a goal, a
message for a waiting execution, dead letters; the stepper and the operators: a
split, a stage change, a send through the gateway; a schedule run; static
memberships with their outbox events; the producer outbox; the suppression list).
An old audit partition left detached holds their events, and has been archived. Then
the first is forgotten. Every text, JSON, bytea and uuid column of every table is
scanned for their id, email and external id; the second user's export is the same as
before; archives are scrubbed.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import gzip
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from typer.testing import CliRunner

import tasks.workflows  # noqa: F401  (installs the stepper's exit hooks, as in every worker)
from db.bulk import driver_connection
from db.partitions import PartitionRange
from db.session import session_scope
from tests.workflow_helpers import deploy_xml, execution
from workers.engine import control, stepper
from workers.events import exits
from workers.events.ingest import IngestResult, ingest
from workers.events.outbox import add_segment_transitions, add_to_outbox
from workers.operators.deliveries import run_action
from workers.privacy import erasure
from workers.privacy.archives import ARCHIVE_RULES, ArchiveError, RowScrubber, scrub_archives
from workers.privacy.erasure import Erasure, NothingFound, stale_entries, uncovered_tables
from workers.privacy.tombstones import ErasedUsers, Identifiers
from workers.retention import archive_partition
from workers.rules.segments import set_static_members
from workers.rules.triggers import TriggerCache
from workers.schedules.runs import ScheduleValues, When, run_batch, start_manual, upsert
from workers.sends import suppressions
from workers.sends.config import GoalDef, WorkflowSettings

pytestmark = pytest.mark.servers

TAG = uuid.uuid4().hex[:8]
SIGNUP, GOAL, REPLY = f"test.er{TAG}.signed_up", f"test.er{TAG}.converted", f"test.er{TAG}.replied"
OLD = PartitionRange("lifecycle_events", dt.date(2001, 1, 1), dt.date(2001, 2, 1))
# Each person's audit events: signup, identify, unsubscribe, reply, goal, and the stage change.
EVENTS = 6
RESTORED = PartitionRange("lifecycle_events", dt.date(2001, 2, 1), dt.date(2001, 3, 1))

JOURNEY = f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:spiffworkflow="http://spiffworkflow.org/bpmn/schema/1.0/core"
    id="erasure-journey" targetNamespace="http://lifecycle-fleet/test">
  <bpmn:message id="reply" name="{REPLY}"/>
  <bpmn:process id="erasure_journey" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="ab"/>
    <bpmn:serviceTask id="ab"><bpmn:extensionElements>
      <spiffworkflow:serviceTaskOperator id="split" resultVariable="ab"><spiffworkflow:parameters>
        <spiffworkflow:parameter id="variants" type="dict" value="{{&quot;a&quot;: 1, &quot;b&quot;: 1}}"/>
      </spiffworkflow:parameters></spiffworkflow:serviceTaskOperator></bpmn:extensionElements>
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing></bpmn:serviceTask>
    <bpmn:sequenceFlow id="f2" sourceRef="ab" targetRef="promote"/>
    <bpmn:serviceTask id="promote"><bpmn:extensionElements>
      <spiffworkflow:serviceTaskOperator id="set_lifecycle_stage" resultVariable="promoted">
        <spiffworkflow:parameters>
          <spiffworkflow:parameter id="stage" type="str" value="&quot;Activation&quot;"/>
        </spiffworkflow:parameters></spiffworkflow:serviceTaskOperator></bpmn:extensionElements>
      <bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing></bpmn:serviceTask>
    <bpmn:sequenceFlow id="f3" sourceRef="promote" targetRef="welcome"/>
    <bpmn:serviceTask id="welcome"><bpmn:extensionElements>
      <spiffworkflow:serviceTaskOperator id="send_message" resultVariable="sent">
        <spiffworkflow:parameters>
          <spiffworkflow:parameter id="channel" type="str" value="&quot;email&quot;"/>
          <spiffworkflow:parameter id="body" type="str" value="&quot;Welcome, &quot; + email"/>
        </spiffworkflow:parameters></spiffworkflow:serviceTaskOperator></bpmn:extensionElements>
      <bpmn:incoming>f3</bpmn:incoming><bpmn:outgoing>f4</bpmn:outgoing></bpmn:serviceTask>
    <bpmn:sequenceFlow id="f4" sourceRef="welcome" targetRef="wait"/>
    <bpmn:intermediateCatchEvent id="wait"><bpmn:incoming>f4</bpmn:incoming>
      <bpmn:outgoing>f5</bpmn:outgoing><bpmn:messageEventDefinition messageRef="reply"/>
    </bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="f5" sourceRef="wait" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f5</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>"""

HUMAN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    id="erasure-human" targetNamespace="http://lifecycle-fleet/test">
  <bpmn:process id="erasure_human" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="call"/>
    <bpmn:userTask id="call"><bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:userTask>
    <bpmn:sequenceFlow id="f2" sourceRef="call" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f2</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>"""


@dataclass
class Person:
    email: str
    external_id: str
    id: uuid.UUID = uuid.UUID(int=0)
    executions: list[uuid.UUID] = field(default_factory=list)

    @property
    def needles(self) -> tuple[str, ...]:
        return (str(self.id), self.email, self.external_id)


@dataclass
class World:
    journey: str
    human: str
    watched: uuid.UUID  # a static segment a segment.entered trigger watches
    triggers: list[uuid.UUID]


@dataclass
class Scene:
    ada: Person
    bob: Person
    before: dict[str, Any]  # each one's export before the erasure
    erased: Erasure
    archives: Path
    old_archive: bytes  # the partition's archive as written before the erasure (gzip)


def _ingest(events: list[Any]) -> IngestResult:
    with session_scope() as session:
        return ingest(session, events, source="test", triggers=TriggerCache(refresh_seconds=0))


def _event(event_type: str, user: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": event_type, "user": user,
            "data": data or {}}


def _settle(execution_id: uuid.UUID) -> None:
    """Step it, running its operator calls as the actions worker would, until it rests."""
    version = execution(execution_id).state_version
    while True:
        with session_scope() as session:
            result = stepper.step(session, execution_id, version)
        if result.action_key is not None:
            with session_scope() as session:
                action = run_action(session, result.action_key)
            if action.step_version is None:
                return
            version = action.step_version
        elif result.next_version is not None and result.send_at is None:
            version = result.next_version
        else:
            return


def _world() -> World:
    journey, human = deploy_xml(JOURNEY), deploy_xml(HUMAN)
    settings = WorkflowSettings(goal=GoalDef(event_type=GOAL, within="3650d"), exit_on_goal=True)
    with session_scope() as session:
        session.execute(text("UPDATE workflows SET settings = CAST(:s AS jsonb) WHERE name = :n"),
                        {"s": json.dumps(settings.model_dump(mode="json")), "n": human})
        never = session.execute(text(
            "INSERT INTO user_segments (name, conditions) VALUES (:n, CAST(:c AS jsonb)) "
            "RETURNING name"), {"n": f"er-never-{TAG}", "c": json.dumps(
                {"field": "user.attributes.plan", "op": "eq", "value": f"never-{TAG}"})}
        ).scalar_one()
        watched = session.execute(text(
            "INSERT INTO user_segments (name, conditions, kind) VALUES (:n, '{}', 'static') "
            "RETURNING id"), {"n": f"er-watched-{TAG}"}).scalar_one()
        triggers = list(session.execute(text(
            "INSERT INTO triggers (name, event_type, conditions, workflow_id, start_variables, "
            "  segment_id) "
            "SELECT :n || k.suffix, k.event_type, CAST(k.conditions AS jsonb), "
            "  (SELECT id FROM workflows WHERE name = k.workflow), CAST(k.variables AS jsonb), "
            "  k.segment FROM (VALUES "
            "  ('-start', :signup, '{}', :journey, :vars, NULL), "
            "  ('-never', :signup, :in_never, :human, '{}', NULL), "
            "  ('-watch', 'segment.entered', '{}', NULL, '{}', CAST(:watched AS uuid))) "
            "  AS k(suffix, event_type, conditions, workflow, variables, segment) RETURNING id"),
            {"n": f"er-{TAG}", "signup": SIGNUP, "journey": journey, "human": human,
             "vars": json.dumps({"email": "user.email", "plan": "event.data.plan"}),
             "in_never": json.dumps({"in_segment": never}), "watched": watched}).scalars())
    return World(journey, human, watched, triggers)


def _populate(world: World, person: Person) -> None:
    """Data of `person` in every table the fleet keeps about a user, by the real paths."""
    signup = _event(SIGNUP, person.email.title(),
                    {"plan": "pro", "contact": person.email, "note": 'a,b "quoted"\nline'})
    result = _ingest([signup,
                      _event("user.identify", person.email, {"external_id": person.external_id,
                                                              "name": "Erasable Person"}),
                      _event("user.unsubscribed", person.email, {"channel": "sms"})])
    assert result.rejected == 0, result
    with session_scope() as session:
        person.id = session.execute(text("SELECT id FROM users WHERE email = :e"),
                                    {"e": person.email}).scalar_one()
        journey = session.execute(text(
            "SELECT id FROM workflow_executions WHERE user_id = :u"), {"u": person.id}).scalar_one()
    person.executions.append(journey)
    _settle(journey)  # split, stage, welcome sent: waits for the reply
    assert execution(journey).awaiting_events == [REPLY]
    with session_scope() as session:
        human = control.start(session, world.human, person.id, {"case": person.email})
    person.executions.append(human)
    _settle(human)  # waits for the person's task
    woken = _ingest([_event(REPLY, str(person.id), {"text": f"from {person.email}"}),
                     _event(GOAL, str(person.id))]).woken  # pending message, goal, exit request
    assert {journey, human} <= {e for e, _ in woken}
    with session_scope() as session:
        segment = session.execute(text(
            "INSERT INTO user_segments (name, conditions, kind) VALUES (:n, '{}', 'static') "
            "RETURNING id"), {"n": f"er-seg-{uuid.uuid4().hex[:8]}"}).scalar_one()
        set_static_members(session, segment, [person.id], add=True)
        add_segment_transitions(session, set_static_members(session, world.watched, [person.id],
                                                            add=True).transitions)
        add_to_outbox(session, f"test.er{TAG}.noted", user=person.email,
                      data={"by": person.external_id})
        suppressions.add(session, person.email, "sms", reason="asked by phone")
        schedule = f"er-schedule-{uuid.uuid4().hex[:8]}"  # definitions name no user
        upsert(session, schedule, ScheduleValues(
            execution(human).workflow_id, When("manual"), segment, batch_size=1, reentry="allow"),
            dt.datetime.now(dt.UTC))
        run = start_manual(session, schedule, dt.datetime.now(dt.UTC))
    with session_scope() as session:
        started = run_batch(session, run.run_id, run.batches, dt.datetime.now(dt.UTC)).started
    person.executions.extend(started)
    dead = _ingest([{"event_type": "Not A Type", "user": person.email},
                    f"garbage for {person.email.upper()}".encode(),
                    _event(f"test.er{TAG}.ref", str(uuid.uuid4()), {"ref": person.external_id})])
    assert dead.rejected == 3, dead


def _export(who: str) -> dict[str, Any]:
    with session_scope() as session:
        return erasure.export(session, who)


def _columns(conn: Connection, table: str) -> list[str]:
    return list(conn.execute(text(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum"), {"t": table}).scalars())


def _detached_copy(engine: Engine, people: list[Person]) -> None:
    """An old partition that a retention run detached and did not drop, with their events."""
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {OLD.name} (LIKE lifecycle_events INCLUDING DEFAULTS)"))
        conn.execute(text(f"ALTER TABLE {OLD.name} ADD FOREIGN KEY (user_id) REFERENCES users (id)"))
        columns = _columns(conn, "lifecycle_events")
        values = ", ".join("TIMESTAMPTZ '2001-01-15 12:00+00'" if c == "created_at" else c
                           for c in columns)
        conn.execute(text(f"INSERT INTO {OLD.name} ({', '.join(columns)}) SELECT {values} "
                          "FROM lifecycle_events WHERE user_id = ANY(:u)"),
                     {"u": [p.id for p in people]})


@pytest.fixture(scope="module")
def scene(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    saved_exits = exits._PROCESS_EXITS
    exits._PROCESS_EXITS = exits.ExitCache(refresh_seconds=0)
    archives = tmp_path_factory.mktemp("archives")
    world = _world()
    ada = Person(f"er-ada-{TAG}@example.com", f"ext-ada-{TAG}")
    bob = Person(f"er-bob-{TAG}@example.com", f"ext-bob-{TAG}")
    try:
        for person in (ada, bob):
            _populate(world, person)
        _detached_copy(engine, [ada, bob])
        archive_partition(engine, OLD, archives)
        old_archive = (archives / f"{OLD.name}.csv.gz").read_bytes()
        before = {"ada": _export(ada.email), "bob": _export(bob.email)}
        erased = erasure.forget_user(ada.email, requested_by="test-operator")
        yield Scene(ada, bob, before, erased, archives, old_archive)
    finally:
        exits._PROCESS_EXITS = saved_exits
        with session_scope() as session:
            session.execute(text("UPDATE triggers SET enabled = false WHERE id = ANY(:t)"),
                            {"t": world.triggers})
            session.execute(text("DELETE FROM event_outbox WHERE partition_key = ANY(:k)"),
                            {"k": [str(bob.id), bob.email]})
            for execution_id in bob.executions:
                if execution(execution_id).status in ("pending", "running"):
                    control.cancel(session, execution_id)
        with engine.begin() as conn:
            for rng in (OLD, RESTORED):
                conn.execute(text(f"DROP TABLE IF EXISTS {rng.name}"))


# --------------------------------------------------------------------------- before


def test_the_user_had_rows_in_every_table_the_registry_covers(scene: Scene) -> None:
    tables = scene.before["ada"]["tables"]
    assert set(tables) == {t.name for t in erasure.REGISTRY}
    assert [name for name, rows in tables.items() if not rows] == []
    assert len(tables["lifecycle_events"]) == 2 * EVENTS  # the partition and its detached copy


def test_the_export_is_json_with_iso_times_and_base64_bytes(scene: Scene) -> None:
    tables = scene.before["ada"]["tables"]
    user = tables["users"][0]
    assert user["email"] == scene.ada.email and user["id"] == str(scene.ada.id)
    assert dt.datetime.fromisoformat(user["created_at"]).utcoffset() == dt.timedelta(0)
    raws = [base64.b64decode(d["raw_payload"]) for d in tables["dead_letters"]]
    assert f"garbage for {scene.ada.email.upper()}".encode() in raws
    assert tables["workflow_executions"][0]["variables"]["email"] == scene.ada.email
    json.dumps(scene.before["ada"])  # every value is JSON


# --------------------------------------------------------------------------- after


def _mentions(engine: Engine, needles: tuple[str, ...]) -> dict[str, int]:
    """{table.column: rows} of every column of every table that holds one of the needles."""
    found: dict[str, int] = {}
    with engine.connect() as conn:
        columns = conn.execute(text(
            "SELECT c.relname, a.attname, t.typname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "JOIN pg_type t ON t.oid = a.atttypid WHERE n.nspname = current_schema() "
            "AND c.relkind = 'r' AND t.typname IN ('text', 'varchar', 'bpchar', 'json', 'jsonb', "
            "'bytea', 'uuid', '_text', '_varchar', '_uuid', '_jsonb')")).all()
        for table, column, type_ in columns:
            value = (f"lower(encode({column}, 'escape'))" if type_ == "bytea"
                     else f"lower(CAST({column} AS text))")
            for needle in needles:
                rows = conn.execute(text(
                    f'SELECT count(*) FROM "{table}" WHERE strpos({value}, lower(:n)) > 0'),
                    {"n": needle}).scalar_one()
                if rows:
                    found[f"{table}.{column}"] = found.get(f"{table}.{column}", 0) + rows
    return found


def test_no_table_holds_the_erased_users_id_email_or_external_id(scene: Scene,
                                                                  engine: Engine) -> None:
    assert _mentions(engine, scene.ada.needles) == {}
    # The scan finds what is there: the other user is everywhere still.
    kept = set(_mentions(engine, scene.bob.needles))
    assert {"users.email", f"{OLD.name}.user_id", "dead_letters.raw_payload",
            "event_outbox.payload", "suppressions.address", "workflow_executions.variables",
            "message_log.recipient", "sends.user_id", "user_consents.user_id"} <= kept
    assert any(re.fullmatch(r"lifecycle_events_(\d{4}_\d{2}|default)\.event_data", c) for c in kept)


def test_the_other_users_data_is_untouched(scene: Scene) -> None:
    after, before = _export(scene.bob.email)["tables"], scene.before["bob"]["tables"]
    cursors = "workflow_schedule_runs"  # erasure may move a run's cursor onto the user before
    assert {t: r for t, r in after.items() if t != cursors} == \
        {t: r for t, r in before.items() if t != cursors}
    assert all(run in after[cursors] for run in before[cursors])


def test_executions_were_cancelled_first_and_late_messages_do_nothing(scene: Scene) -> None:
    assert scene.erased.cancelled == len(scene.ada.executions) == 3
    counts, before = scene.erased.counts, scene.before["ada"]["tables"]
    assert counts["execution_steps"] == len(before["execution_steps"]) + 3  # + the cancel rows
    assert {t: n for t, n in counts.items() if t != "execution_steps"} == \
        {t: len(rows) for t, rows in before.items() if t != "execution_steps"}
    keys = [d["key"] for d in before["action_deliveries"]]
    with session_scope() as session:
        for execution_id in scene.ada.executions:
            assert stepper.step(session, execution_id, 1).outcome == "noop"
        assert {run_action(session, key).status for key in keys} == {"missing"}
    # The audit rows stay, with no user and no data: the per-type counts hold.
    with session_scope() as session:
        kept = session.execute(text(
            "SELECT event_type, event_data, user_id FROM lifecycle_events WHERE event_id = "
            "ANY(CAST(:ids AS uuid[]))"),
            {"ids": [e["event_id"] for e in before["lifecycle_events"]]}).all()
    assert len(kept) == EVENTS and all((r.event_data, r.user_id) == ({}, None) for r in kept)


def test_the_tombstone_names_the_user_by_keyed_hashes_only(scene: Scene, engine: Engine) -> None:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM erasure_tombstones WHERE id = :i"),
                            {"i": scene.erased.tombstone.id}).mappings().all()
        key = conn.execute(text("SELECT key FROM erasure_keys k JOIN workspaces w "
                                "ON w.id = k.workspace_id WHERE w.name = 'default'")).scalar_one()
        erased = ErasedUsers.load(conn)
    assert str(scene.ada.id) in erased and str(scene.ada.id).upper() in erased
    assert str(scene.bob.id) not in erased
    assert len(rows) == 1
    row = rows[0]
    assert row["requested_by"] == "test-operator" and row["counts"] == dict(scene.erased.counts)
    ids = Identifiers(scene.ada.id, scene.ada.email, (scene.ada.external_id,))
    expected = erasure.tombstones.refs(bytes(key), ids)
    assert row["user_ref"] == expected[0] and sorted(row["identifier_refs"]) == sorted(expected)
    assert not any(n.lower() in json.dumps(dict(row), default=str).lower()
                   for n in scene.ada.needles)


def test_forgetting_again_erases_nothing_more_and_keeps_one_tombstone(scene: Scene) -> None:
    for who in (scene.ada.email, str(scene.ada.id), scene.ada.email.upper()):
        again = erasure.forget_user(who, requested_by="someone else")
        assert again.already_erased and not again.user_found and again.cancelled == 0
        assert set(again.counts.values()) == {0}
        assert again.tombstone.id == scene.erased.tombstone.id
        assert again.tombstone.requested_by == "test-operator"
    with session_scope() as session:
        assert session.execute(text("SELECT count(*) FROM erasure_tombstones WHERE id = :i"),
                               {"i": scene.erased.tombstone.id}).scalar_one() == 1
    with pytest.raises(NothingFound):
        erasure.forget_user(f"nobody-{TAG}@example.com")


def test_the_export_of_an_erased_user_says_so_and_holds_nothing(scene: Scene) -> None:
    after = _export(scene.ada.email)
    assert not after["user_found"] and after["erased"]["requested_by"] == "test-operator"
    assert all(rows == [] for rows in after["tables"].values())


# --------------------------------------------------------------------------- archives


def _csv(gz: bytes) -> list[bytes]:
    return gzip.decompress(gz).splitlines(keepends=True)


def test_scrub_archives_rewrites_the_erased_users_rows_and_the_manifest(scene: Scene,
                                                                         engine: Engine) -> None:
    data = scene.archives / f"{OLD.name}.csv.gz"
    manifest_path = scene.archives / f"{OLD.name}.manifest.json"
    with engine.connect() as conn:
        erased = ErasedUsers.load(conn)
    [done] = scrub_archives(scene.archives, erased)
    assert (done.rows, done.scrubbed) == (2 * EVENTS, EVENTS)
    old, new = _csv(scene.old_archive), _csv(data.read_bytes())
    assert len(old) == len(new) == 2 * EVENTS + 1
    assert not any(n.lower().encode() in gzip.decompress(data.read_bytes()).lower()
                   for n in scene.ada.needles)
    bob_rows = [line for line in old if str(scene.bob.id).encode() in line]
    assert len(bob_rows) == EVENTS and all(line in new for line in bob_rows)  # byte for byte
    header = next(csv.reader([old[0].decode()]))
    scrubbed = [dict(zip(header, row, strict=True))
                for row in csv.reader(line.decode() for line in new if line not in old)]
    assert len(scrubbed) == EVENTS
    assert {(r["user_id"], r["event_data"]) for r in scrubbed} == {("", "{}")}
    assert {r["event_type"] for r in scrubbed} >= {SIGNUP, GOAL, REPLY}
    manifest = json.loads(manifest_path.read_text())
    assert manifest["rows"] == 2 * EVENTS and manifest["scrubbed_rows"] == EVENTS
    assert manifest["sha256_of_csv"] == hashlib.sha256(gzip.decompress(data.read_bytes())).hexdigest()
    before = data.read_bytes()
    [again] = scrub_archives(scene.archives, erased)
    assert again.scrubbed == 0 and data.read_bytes() == before


def test_an_archive_written_after_the_erasure_has_the_erased_users_rows_scrubbed(
        scene: Scene, engine: Engine) -> None:
    """An old archive restored into a table and archived again: tombstones apply on the way out."""
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {RESTORED.name} (LIKE lifecycle_events INCLUDING DEFAULTS)"))
        with driver_connection(conn).cursor() as cur, cur.copy(
                f"COPY {RESTORED.name} FROM STDIN (FORMAT csv, HEADER true)") as copy:
            copy.write(gzip.decompress(scene.old_archive))
    archive_partition(engine, RESTORED, scene.archives)
    written = gzip.decompress((scene.archives / f"{RESTORED.name}.csv.gz").read_bytes())
    assert not any(n.lower().encode() in written.lower() for n in scene.ada.needles)
    assert written.count(str(scene.bob.id).encode()) == EVENTS
    manifest = json.loads((scene.archives / f"{RESTORED.name}.manifest.json").read_text())
    assert (manifest["rows"], manifest["scrubbed_rows"]) == (2 * EVENTS, EVENTS)
    with engine.begin() as conn:  # retention drops the table it archived
        conn.execute(text(f"DROP TABLE {RESTORED.name}"))


def test_the_scrubber_keeps_postgresqls_csv_exactly(engine: Engine) -> None:
    """Quoted commas, quotes, newlines, empty strings and NULLs survive a scrub byte for byte,
    and PostgreSQL reads the scrubbed row back as the scrub meant it."""
    erased_id, kept_id = uuid.uuid4(), uuid.uuid4()
    rows = ("SELECT * FROM (VALUES "
            "(1, CAST(:e AS uuid), E'multi\\nline, \"q\"', '', NULL, "
            "CAST('{\"a\": \"x,y\"}' AS jsonb)), "
            "(2, CAST(:k AS uuid), E'two\\n\\nlines', '', NULL, CAST('{}' AS jsonb)), "
            "(3, NULL, 'plain', NULL, '', NULL)) AS t(id, user_id, note, empty, nul, event_data) "
            "ORDER BY id")
    with engine.connect() as conn:
        with driver_connection(conn).cursor() as cur, cur.copy(
                f"COPY ({rows.replace(':e', repr(str(erased_id))).replace(':k', repr(str(kept_id)))}"
                ") TO STDOUT (FORMAT csv, HEADER true)") as copy:
            original = b"".join(bytes(c) for c in copy)
        conn.execute(text("CREATE TEMP TABLE erasure_csv (id int, user_id uuid, note text, "
                          "empty text, nul text, event_data jsonb)"))
        erased = ErasedUsers([(b"k" * 32, frozenset({erasure.tombstones.ref(
            b"k" * 32, "id", str(erased_id))}))])
        scrubber = RowScrubber(ARCHIVE_RULES["lifecycle_events"], erased)
        # Chunks cut anywhere, as COPY and gzip hand them over.
        scrubbed = b"".join(scrubber.filter(original[i:i + 7] for i in range(0, len(original), 7)))
        assert (scrubber.rows, scrubber.scrubbed) == (3, 1)
        first = original.index(b"\n2,")
        assert scrubbed.endswith(original[first:])  # the other rows, byte for byte
        with driver_connection(conn).cursor() as cur, cur.copy(
                "COPY erasure_csv FROM STDIN (FORMAT csv, HEADER true)") as copy:
            copy.write(scrubbed)
        back = conn.execute(text("SELECT * FROM erasure_csv ORDER BY id")).all()
    assert back[0] == (1, None, "multi\nline, \"q\"", "", None, {})
    assert back[1] == (2, kept_id, "two\n\nlines", "", None, {})
    assert back[2] == (3, None, "plain", None, "", None)


def _archive(folder: Path, name: str, csv_bytes: bytes) -> Path:
    """An archive as `fleet retention` writes one: the CSV gzipped and its manifest."""
    (folder / f"{name}.csv.gz").write_bytes(gzip.compress(csv_bytes))
    manifest = folder / f"{name}.manifest.json"
    manifest.write_text(json.dumps({
        "table": "lifecycle_events", "partition": name, "rows": csv_bytes.count(b"\n") - 1,
        "sha256_of_csv": hashlib.sha256(csv_bytes).hexdigest()}))
    return manifest


def test_a_scrub_killed_between_its_renames_is_finished_by_the_next(tmp_path: Path) -> None:
    erased_id, key = uuid.uuid4(), b"k" * 32
    erased = ErasedUsers([(key, frozenset({erasure.tombstones.ref(key, "id", str(erased_id))}))])
    original = (b"id,user_id,event_data\n1," + str(erased_id).encode() + b',"{""a"": 1}"\n'
                b"2,,{}\n")
    manifest = _archive(tmp_path, "lifecycle_events_2001_05", original)
    first = manifest.read_text()
    [done] = scrub_archives(tmp_path, erased)
    assert done.scrubbed == 1
    # As if killed after the data's rename: the new manifest still waits beside the old one.
    manifest.with_name(manifest.name + ".scrubbing").write_text(manifest.read_text())
    manifest.write_text(first)
    [again] = scrub_archives(tmp_path, erased)
    assert again.scrubbed == 0 and not manifest.with_name(manifest.name + ".scrubbing").exists()
    data = gzip.decompress((tmp_path / "lifecycle_events_2001_05.csv.gz").read_bytes())
    assert data == b"id,user_id,event_data\n1,,{}\n2,,{}\n"
    assert json.loads(manifest.read_text())["sha256_of_csv"] == hashlib.sha256(data).hexdigest()
    (tmp_path / "lifecycle_events_2001_05.csv.gz").write_bytes(gzip.compress(data + b"3,,{}\n"))
    with pytest.raises(ArchiveError, match="SHA-256"):  # a file its manifest does not describe
        scrub_archives(tmp_path, erased)


def test_fleet_retention_scrub_archives(scene: Scene) -> None:
    from workers.cli.main import app

    result = CliRunner().invoke(app, ["retention", "scrub-archives", str(scene.archives), "--json"])
    assert result.exit_code == 0, result.output
    done = {a["partition"]: a["scrubbed"] for a in json.loads(result.stdout)}
    assert OLD.name in done and set(done.values()) == {0}  # scrubbed already: nothing changes


# --------------------------------------------------------------------------- coverage


def test_every_table_that_can_hold_a_users_data_is_covered(engine: Engine) -> None:
    with engine.connect() as conn:
        assert uncovered_tables(conn) == {}
        assert stale_entries(conn) == []


def test_the_coverage_check_fails_for_a_new_table_with_user_data(engine: Engine) -> None:
    with engine.connect() as conn:
        with conn.begin() as transaction:
            conn.execute(text("CREATE TABLE erasure_scratch_a (id bigint, user_id uuid)"))
            conn.execute(text("CREATE TABLE erasure_scratch_b (id bigint, extra jsonb)"))
            conn.execute(text("CREATE TABLE erasure_scratch_c (id bigint, "
                              "who uuid REFERENCES users (id))"))
            conn.execute(text("CREATE TABLE erasure_scratch_d (id bigint, label text)"))
            found = uncovered_tables(conn)
            transaction.rollback()
    assert found == {"erasure_scratch_a": ["column user_id"],
                     "erasure_scratch_b": ["jsonb column extra"],
                     "erasure_scratch_c": ["a foreign key to users"]}


# --------------------------------------------------------------------------- the commands


def test_fleet_user_forget_and_export(tmp_path: Path) -> None:
    from workers.cli.main import app

    email = f"er-cli-{TAG}@example.com"
    assert _ingest([_event(f"test.er{TAG}.cli", email, {"mail": email})]).rejected == 0
    runner = CliRunner()
    exported = runner.invoke(app, ["user", "export", email.upper(), "--out", str(tmp_path / "x")])
    assert exported.exit_code == 0, exported.output
    document = json.loads((tmp_path / "x").read_text())
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o600
    assert [r["email"] for r in document["tables"]["users"]] == [email]
    assert len(document["tables"]["lifecycle_events"]) == 1
    refused = runner.invoke(app, ["user", "forget", email])  # no terminal, no --yes
    assert refused.exit_code == 2
    done = runner.invoke(app, ["user", "forget", email, "--yes", "--json", "--by", "dpo"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    rows = {t["table"]: t["rows"] for t in report["tables"]}
    assert rows["users"] == 1 and rows["lifecycle_events"] == 1 and report["user_found"]
    assert report["tombstone"]["requested_by"] == "dpo"
    again = runner.invoke(app, ["user", "forget", email, "--yes"])
    assert again.exit_code == 0 and "already erased" in again.stdout
    # The address comes back as a new user: forgotten under the same tombstone, both ids erased.
    _ingest([_event(f"test.er{TAG}.cli", email)])
    first = uuid.UUID(document["tables"]["users"][0]["id"])
    second = uuid.UUID(_export(email)["tables"]["users"][0]["id"])
    returned = runner.invoke(app, ["user", "forget", str(second), "--yes", "--json"])
    assert returned.exit_code == 0, returned.output
    assert json.loads(returned.stdout)["tombstone"]["id"] == report["tombstone"]["id"]
    with session_scope() as session:
        erased = ErasedUsers.load(session)
    assert str(first) in erased and str(second) in erased
    missing = runner.invoke(app, ["user", "export", f"nobody-{TAG}@example.com"])
    assert missing.exit_code == 1
