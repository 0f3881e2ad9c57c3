"""Parsed workflow specs, cached per worker process by (workflow id, version).

A version's BPMN files never change once deployed (`workflow_versions`: the main
file and the files of the processes it calls), so a parsed spec can be kept for the
life of the process; the cache is bounded (LRU).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from threading import Lock
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import tenancy
from db.models import WorkflowVersion
from workers.engine.validate import validate_bpmn


@dataclass(frozen=True)
class LoadedSpec:
    workflow_id: uuid.UUID
    version: str
    process_id: str
    spec: Any  # SpiffWorkflow BpmnProcessSpec
    subprocess_specs: dict[str, Any]
    awaited_events: frozenset[str] = frozenset()  # message names its waits catch
    lookbacks: Mapping[str, dt.timedelta] = field(default_factory=dict)  # per message name


class SpecNotFound(LookupError):
    """The execution names a workflow version that was never deployed."""


class SpecCache:
    def __init__(self, size: int = 256) -> None:
        self._size = size
        # By workspace too: a spec is read under its workspace's row-level security, and
        # a hit must never hand one workspace's spec to another's execution.
        self._specs: OrderedDict[tuple[uuid.UUID, uuid.UUID, str], LoadedSpec] = OrderedDict()
        self._lock = Lock()

    def get(self, session: Session, workflow_id: uuid.UUID, version: str) -> LoadedSpec:
        key = (tenancy.current_workspace(), workflow_id, version)
        with self._lock:
            if key in self._specs:
                self._specs.move_to_end(key)
                return self._specs[key]
        row = session.execute(select(
            WorkflowVersion.bpmn_xml, WorkflowVersion.extra_files, WorkflowVersion.process_id,
        ).where(WorkflowVersion.workflow_id == workflow_id,
                WorkflowVersion.version == version)).one_or_none()
        if row is None:
            raise SpecNotFound(f"workflow {workflow_id} has no deployed version {version}")
        # Operators were checked at deploy; the stored process id keeps the choice made then.
        validated = validate_bpmn(row.bpmn_xml, others=row.extra_files,
                                  process_id=row.process_id)
        parsed = validated.parsed
        loaded = LoadedSpec(workflow_id, version, parsed.process_id, parsed.spec,
                            parsed.subprocess_specs, validated.awaited_events,
                            validated.lookbacks)
        with self._lock:
            self._specs[key] = loaded
            while len(self._specs) > self._size:
                self._specs.popitem(last=False)
        return loaded


SPECS = SpecCache()  # the worker process's cache
