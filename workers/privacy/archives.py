"""Tombstones applied to the audit archives: as `fleet retention` writes them, and afterwards.

An archive is a partition's PostgreSQL CSV (with header), gzipped, beside a manifest
(rows, columns, SHA-256 of the CSV). An erased user's row is scrubbed as erasure
scrubs it in the database: `user_id` and `event_data` emptied, type, stage and times
kept, so the archive's row count stays its partition's. Rows are found by the HMAC of
their user_id (`ErasedUsers`); every other row is passed on byte for byte, so a scrub
changes exactly the erased users' rows and a second scrub changes nothing.

The CSV is split into records and fields by PostgreSQL's CSV rules (a quoted field may
hold commas, doubled quotes and newlines), in bytes: the delimiter, quote and newline
are ASCII and never part of a UTF-8 sequence.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.privacy.tombstones import Db, ErasedUsers

READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class ArchiveRule:
    """How an erased user's row of an archived table is scrubbed."""

    user_column: str
    replace: Mapping[str, bytes]  # column: its CSV field in a scrubbed row (b"": NULL)


# The tables `fleet retention` archives; the same treatment as erasure's in the database.
ARCHIVE_RULES: dict[str, ArchiveRule] = {
    "lifecycle_events": ArchiveRule("user_id", {"user_id": b"", "event_data": b"{}"}),
}

_QUOTED = rb'"(?:[^"]|"")*"'  # may hold commas, doubled quotes, newlines
_FIELD = re.compile(_QUOTED + rb"|[^,]*")


def _nth_field(index: int) -> re.Pattern[bytes]:
    """Matches a record's first `index` fields and captures the next: one C call per row."""
    field = rb'(?:%s|[^,"\n]*)' % _QUOTED
    return re.compile(rb"(?:%s,){%d}(%s)" % (field, index, field))


class ArchiveError(ValueError):
    """An archive that does not match its manifest, or is not PostgreSQL CSV."""


def _records(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    """CSV records with their line ends, exactly as read (a quoted field may span lines)."""
    pending = b""
    partial: list[bytes] = []
    quotes = 0
    for chunk in chunks:
        lines = (pending + bytes(chunk)).split(b"\n")
        pending = lines.pop()
        for line in lines:
            partial.append(line)
            quotes += line.count(b'"')
            if quotes % 2 == 0:
                yield b"\n".join(partial) + b"\n"
                partial.clear()
                quotes = 0
    rest = b"\n".join(partial) + (b"\n" if partial else b"") + pending
    if rest:
        yield rest


def _fields(record: bytes) -> list[bytes]:
    """The raw fields of one record (quotes kept), without its line end."""
    body = record[:-1] if record.endswith(b"\n") else record
    fields: list[bytes] = []
    pos = 0
    while True:
        match = _FIELD.match(body, pos)
        assert match is not None  # the pattern matches the empty string
        fields.append(match.group())
        pos = match.end()
        if pos == len(body):
            return fields
        if body[pos:pos + 1] != b",":
            raise ArchiveError(f"not PostgreSQL CSV near {body[pos:pos + 40]!r}")
        pos += 1
        if pos == len(body):
            fields.append(b"")
            return fields


def _value(field: bytes) -> bytes:
    if field.startswith(b'"'):
        return field[1:-1].replace(b'""', b'"')
    return field


class RowScrubber:
    """Passes a table's CSV through, with the rows of erased users scrubbed (streaming)."""

    def __init__(self, rule: ArchiveRule, erased: ErasedUsers) -> None:
        self.rule, self.erased = rule, erased
        self.rows = 0  # data records seen
        self.scrubbed = 0  # records rewritten

    def filter(self, chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
        records = _records(chunks)
        header = next(records, None)
        if header is None:
            return
        names = [_value(f).decode() for f in _fields(header)]
        try:
            user = names.index(self.rule.user_column)
            replace = {names.index(c): v for c, v in self.rule.replace.items()}
        except ValueError:
            raise ArchiveError(f"the header has no {self.rule.user_column} or "
                               f"{', '.join(self.rule.replace)}: {names}") from None
        nth = _nth_field(user)
        yield header
        for record in records:
            self.rows += 1
            head = nth.match(record)
            if head is None:
                raise ArchiveError(f"record {self.rows} has no field {user + 1}")
            if _value(head.group(1)).decode() in self.erased:
                fields = _fields(record)
                if len(fields) != len(names):
                    raise ArchiveError(f"record {self.rows} has {len(fields)} fields, "
                                       f"the header {len(names)}")
                for index, value in replace.items():
                    fields[index] = value
                record = b",".join(fields) + b"\n"
                self.scrubbed += 1
            yield record


def archive_scrubber(db: Db, table: str) -> RowScrubber | None:
    """The scrubber `fleet retention` passes an archive through; None: nothing to apply."""
    rule = ARCHIVE_RULES.get(table)
    if rule is None:
        return None
    erased = ErasedUsers.load(db)
    return RowScrubber(rule, erased) if erased else None


@dataclass(frozen=True)
class ArchiveScrub:
    """What scrubbing one archive did."""

    archive: Path
    partition: str
    rows: int
    scrubbed: int  # rows rewritten by this scrub (0: the file was left as it was)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def scrub_archive(manifest_path: Path, erased: ErasedUsers,
                  now: dt.datetime | None = None) -> ArchiveScrub:
    """Rewrite one archive without its erased users' data; its manifest follows.

    The file is read once and checked against the manifest (SHA-256, row count); only
    if a row changed is it replaced (a new file, then renamed), and the manifest gets
    the new SHA-256 and the scrub's count. The new manifest is written beside the old
    one before the rename, so a scrub killed between the two renames is finished by
    the next one instead of leaving a mismatch.
    """
    manifest = json.loads(manifest_path.read_text())
    data = manifest_path.with_name(f"{manifest['partition']}.csv.gz")
    pending = manifest_path.with_name(manifest_path.name + ".scrubbing")
    rule = ARCHIVE_RULES.get(manifest["table"])
    if rule is None or not erased:
        return ArchiveScrub(data, manifest["partition"], int(manifest["rows"]), 0)
    scrubber = RowScrubber(rule, erased)
    before, after = hashlib.sha256(), hashlib.sha256()
    tmp = data.with_name(data.name + ".scrubbing")

    def read() -> Iterator[bytes]:
        with gzip.open(data, "rb") as src:
            while block := src.read(READ_BLOCK):
                before.update(block)
                yield block

    try:
        with gzip.open(tmp, "wb") as dst:
            for record in scrubber.filter(read()):
                after.update(record)
                dst.write(record)
        adopted = before.hexdigest() != manifest["sha256_of_csv"] and pending.exists()
        if adopted:  # a scrub killed between its renames: its manifest is the file's
            manifest = json.loads(pending.read_text())
        if before.hexdigest() != manifest["sha256_of_csv"]:
            raise ArchiveError(f"{data} does not match its manifest's SHA-256")
        if scrubber.rows != int(manifest["rows"]):
            raise ArchiveError(f"{data} has {scrubber.rows} rows, its manifest {manifest['rows']}")
        if scrubber.scrubbed:
            manifest.update(
                sha256_of_csv=after.hexdigest(),
                scrubbed_rows=int(manifest.get("scrubbed_rows", 0)) + scrubber.scrubbed,
                scrubbed_at=(now or dt.datetime.now(dt.UTC)).isoformat())
            _write_json(pending, manifest)
            os.replace(tmp, data)
            os.replace(pending, manifest_path)
        elif adopted:
            os.replace(pending, manifest_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ArchiveScrub(data, manifest["partition"], scrubber.rows, scrubber.scrubbed)


def scrub_archives(directory: Path, erased: ErasedUsers) -> list[ArchiveScrub]:
    """Scrub every archive whose manifest is in `directory`."""
    return [scrub_archive(path, erased) for path in sorted(directory.glob("*.manifest.json"))]
