"""A synthetic product's event stream for `fleet demo`: pure, seeded, deterministic.

`generate(users=3000, days=30, seed=7, end=...)` simulates "Acme", a SaaS product
with a free plan and Pro, over the `days` simulated days that end at `end`. Each
user gets a persona that shapes what they do after signing up:

| persona  | share | behaviour |
|----------|-------|-----------|
| bouncer  | 30%   | signs up, maybe one more visit, never creates a project |
| explorer | 20%   | looks around for a week; a quarter create a project late (after the nudge) |
| casual   | 25%   | first project in 1-3 days, then visits now and then; a few upgrade on their own |
| fader    | 12%   | first project, a busy week, then silence (the win-back's audience) |
| power    | 13%   | daily user, many projects; about half upgrade to Pro, paying ones refer friends |

Users from countries on Central European Time carry a `timezone` trait (a few an
invalid one, which the send gateway replaces by the program's zone with a warning);
about 6% unsubscribe from e-mail a few days after signing up (`user.unsubscribed`),
so the gateway has consent to apply. A tenth of the users who go on to create projects
create their first one seconds after signing up, before the activation nudge has
begun waiting for it: the nudge's wait looks back, so none of them is nudged.

Referred friends sign up a day or two after the referral (extra users, with a
persona of their own). A handful of deliberately bad inputs (an unknown user id, a
malformed event type, data that is not an object, a truncated JSON line, ...)
travel with the good events, to show dead-lettering.

The stream is cut into phases the demo sends one after the other: one per simulated
day (events in order of `occurred_at`), then the weekly win-back (no events: the demo
runs the program's `weekly-win-back` schedule, which starts the win-back for every
member of `churn-risk`), then the replies to the win-back mails (sessions of some
users who had gone quiet; no `occurred_at`: they happen now).

The same arguments give the same stream, event ids included: behaviour comes from
a `random.Random` per user seeded with (seed, user number), ids are UUIDv5 of
(tag, seed, email, n). `tag` names the run: `<tag>.example.com` is the e-mail
domain of every user, so a second run against the same database meets none of the
first run's users or events, and a run's rows can be told apart by it.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

WIN_BACK_SCHEDULE = "weekly-win-back"  # program.yaml's schedule for the quiet users
NAMESPACE = uuid.UUID("0b9e2d53-6f7c-4c1e-9a44-3d8f2a61c0de")
PERSONAS: tuple[tuple[str, float], ...] = (
    ("bouncer", 0.30), ("explorer", 0.20), ("casual", 0.25), ("fader", 0.12), ("power", 0.13))
SOURCES: tuple[tuple[str, float], ...] = (
    ("organic", 0.40), ("ads", 0.25), ("content", 0.20), ("partner", 0.15))
FIRST_NAMES = (
    "ada", "alan", "amara", "ana", "arjun", "bea", "carlos", "chen", "dana", "david", "elena",
    "emeka", "fatima", "grace", "hana", "hugo", "ines", "ivan", "jamal", "jin", "julia", "kai",
    "karin", "lars", "leila", "lucas", "maya", "mei", "mohammed", "nadia", "noah", "olga",
    "omar", "priya", "rafael", "sara", "sofia", "tariq", "tom", "yuki", "zara", "zoe")
LAST_NAMES = (
    "adams", "ahmed", "bauer", "chen", "costa", "dubois", "eriksen", "fischer", "garcia",
    "haddad", "ito", "jansen", "kim", "kowalski", "lopez", "mensah", "moreau", "nakamura",
    "novak", "okafor", "patel", "rossi", "santos", "schmidt", "silva", "singh", "tanaka",
    "varga", "wang", "weber", "yilmaz", "zhang")
COUNTRIES = ("DE", "FR", "GB", "US", "US", "US", "IN", "BR", "JP", "NL", "ES", "CA", "NG", "PL")
FEATURES = ("editor", "templates", "comments", "export", "dashboards", "integrations", "api")
PROJECT_NAMES = ("Q3 roadmap", "Launch plan", "Hiring pipeline", "Website refresh",
                 "Customer interviews", "Sprint board", "Budget 2027", "Onboarding checklist",
                 "Bug triage", "Content calendar", "OKRs", "Design system")
DEVICES = ("web", "web", "web", "ios", "android", "desktop")
# The `timezone` trait by country: zones that keep the program's (Europe/Berlin) clock,
# so the demo's send window opens for them at once; "Europe/Atlantis" is invalid.
TIMEZONES = {"DE": "Europe/Berlin", "FR": "Europe/Paris", "ES": "Europe/Madrid",
             "NL": "Europe/Atlantis"}
UNSUBSCRIBE_RATE = 0.06
EAGER_RATE = 0.10  # of activating users: first project seconds after signing up

# Users whose last visit is older than this at `end` are the win-back's audience
# (the `churn-risk` segment of program/program.yaml).
QUIET_DAYS = 14
WIN_BACK_REPLY_RATE = 0.35


@dataclass(frozen=True)
class Phase:
    """What the demo sends in one go: a simulated day, the weekly run, the replies."""

    name: str
    events: tuple[dict[str, Any], ...]
    bad: tuple[Any, ...] = ()  # deliberately bad inputs, sent among the good events
    schedule: str | None = None  # a schedule the demo runs at this point (no events)

    def to_send(self) -> list[Any]:
        """The good events with the bad inputs spread evenly among them (a fixed order)."""
        out: list[Any] = list(self.events)
        for k, item in enumerate(self.bad):
            out.insert((k + 1) * len(self.events) // (len(self.bad) + 1) + k, item)
        return out


@dataclass(frozen=True)
class DemoStream:
    tag: str
    domain: str  # every user's e-mail domain: the run's users are `%@domain`
    seed: int
    start: dt.datetime
    end: dt.datetime
    phases: tuple[Phase, ...]
    personas: dict[str, int]  # users per persona, referred friends included
    users: int  # users who sign up (referred friends included)
    referred: int  # of which referred friends

    @property
    def good(self) -> int:
        return sum(len(p.events) for p in self.phases)

    @property
    def bad(self) -> int:
        return sum(len(p.bad) for p in self.phases)

    def events(self) -> Iterator[dict[str, Any]]:
        """Every good event, in send order."""
        for phase in self.phases:
            yield from phase.events

    def bad_inputs(self) -> Iterator[Any]:
        for phase in self.phases:
            yield from phase.bad

    def counts(self) -> Counter[str]:
        """Good events per type."""
        return Counter(e["event_type"] for e in self.events())


@dataclass
class _User:
    number: int
    email: str
    first_name: str
    last_name: str
    persona: str
    signup_day: int
    rng: random.Random
    source: str
    referrer: str | None = None
    events: list[tuple[dt.datetime, int, dict[str, Any]]] = field(default_factory=list)
    sessions: int = 0
    projects: int = 0
    first_project_day: int | None = None
    engaged_day: int | None = None
    upgraded_day: int | None = None
    last_active_day: int = 0


class _Simulation:
    def __init__(self, users: int, days: int, seed: int, end: dt.datetime, tag: str) -> None:
        self.days, self.seed, self.tag = days, seed, tag
        self.end = end
        self.start = end - dt.timedelta(days=days)
        self.domain = f"{tag}.example.com"
        self.base_users = users
        self.users: list[_User] = []
        self.friends: list[tuple[int, str]] = []  # (signup day, referrer email)
        self.seq = 0

    # ---------------------------------------------------------------- helpers

    def _event_id(self, email: str, n: int) -> str:
        return str(uuid.uuid5(NAMESPACE, f"{self.tag}:{self.seed}:{email}:{n}"))

    def _emit(self, user: _User, when: dt.datetime, event_type: str,
              data: dict[str, Any]) -> None:
        n = len(user.events)
        event = {"event_id": self._event_id(user.email, n), "event_type": event_type,
                 "user": user.email, "occurred_at": _iso(when),
                 "data": data}
        self.seq += 1
        user.events.append((when, self.seq, event))

    def _at(self, user: _User, day: int) -> dt.datetime:
        """A moment of a simulated day, in the user's waking hours."""
        seconds = user.rng.randint(7 * 3600, 22 * 3600)
        return self.start + dt.timedelta(days=day, seconds=seconds)

    def _identity(self, number: int) -> tuple[random.Random, str, str, str]:
        """User `number`'s random generator, first and last name, and e-mail."""
        rng = random.Random(f"{self.seed}:{number}")
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        return rng, first, last, f"{first}.{last}.{number}@{self.domain}"

    def _new_user(self, number: int, signup_day: int, referrer: str | None) -> _User:
        rng, first, last, email = self._identity(number)
        persona = _pick(rng, PERSONAS)
        source = "referral" if referrer else _pick(rng, SOURCES)
        return _User(number=number, email=email, first_name=first.title(), last_name=last.title(),
                     persona=persona, signup_day=signup_day, rng=rng, source=source,
                     referrer=referrer)

    # ---------------------------------------------------------------- one user's month

    def simulate(self, user: _User) -> None:
        rng, days = user.rng, self.days
        p = _PROFILE[user.persona]
        t = self._at(user, user.signup_day)
        country = rng.choice(COUNTRIES)
        traits = {"first_name": user.first_name, "last_name": user.last_name,
                  "country": country, "plan": "free", "source": user.source,
                  "last_seen_at": _iso(t)}
        if country in TIMEZONES:
            traits["timezone"] = TIMEZONES[country]
        self._emit(user, t, "user.identify", traits)
        signup = {"plan": "free", "source": user.source}
        if user.referrer:
            signup["referrer"] = user.referrer
        self._emit(user, t + dt.timedelta(seconds=1), "user.signed_up", signup)
        self._session(user, user.signup_day, t + dt.timedelta(seconds=5))

        if p.activates:
            user.first_project_day = user.signup_day + rng.choice((1, 1, 2, 2, 3))
            # Its own generator, so the rest of the user's behaviour is as without it.
            if random.Random(f"{self.seed}:{user.number}:eager").random() < EAGER_RATE:
                user.first_project_day = user.signup_day
                user.projects += 1
                self._emit(user, t + dt.timedelta(seconds=2), "project.created", {
                    "project_id": f"p-{user.number}-{user.projects}", "name": "My first project",
                    "template": "blank"})
        elif user.persona == "explorer" and rng.random() < 0.25:
            user.first_project_day = user.signup_day + rng.randint(5, 9)  # after the nudge
        active_until = user.signup_day + p.active_for(rng, days)
        if user.persona == "fader" and user.first_project_day is not None:
            active_until = user.first_project_day + rng.randint(3, 9)
        will_upgrade = rng.random() < p.upgrade_rate
        upgrade_delay = rng.randint(1, 4)
        direct_upgrade_day = (user.signup_day + rng.randint(4, 12)
                              if rng.random() < p.direct_upgrade_rate else None)
        referral_day: int | None = (user.signup_day + rng.randint(3, 20)
                                    if rng.random() < p.refer_rate_free else None)

        # Its own generator, so the rest of the user's behaviour is as without it.
        consent = random.Random(f"{self.seed}:{user.number}:consent")
        unsubscribe_day = (user.signup_day + consent.randint(1, 4)
                           if consent.random() < UNSUBSCRIBE_RATE else None)
        unsubscribe_at = consent.randint(7 * 3600, 22 * 3600)

        for day in range(user.signup_day + 1, days):
            if day == unsubscribe_day:
                self._emit(user, self.start + dt.timedelta(days=day, seconds=unsubscribe_at),
                           "user.unsubscribed",
                           {"channel": "email", "reason": "too many e-mails"})
            planned = day == user.first_project_day
            upgrade_due = user.upgraded_day is None and (
                (will_upgrade and user.engaged_day is not None
                 and day >= user.engaged_day + upgrade_delay)
                or (direct_upgrade_day is not None and day >= direct_upgrade_day
                    and user.first_project_day is not None and day > user.first_project_day))
            referral_due = referral_day is not None and day >= referral_day
            visits = day <= active_until and rng.random() < p.active_rate
            if not (planned or visits or upgrade_due or referral_due):
                continue
            t = self._at(user, day)
            self._session(user, day, t)
            t += dt.timedelta(minutes=rng.randint(2, 20))
            if upgrade_due:
                seats = rng.choice((1, 1, 2, 3, 5, 8))
                self._emit(user, t, "subscription.upgraded",
                           {"plan": "pro", "seats": seats, "mrr": 12 * seats, "currency": "EUR"})
                user.upgraded_day = day
                t += dt.timedelta(minutes=1)
                if rng.random() < p.refer_rate_paid:
                    referral_day = day + rng.randint(2, 7)
            elif referral_due:
                if day + 1 < days:  # the friend signs up a day or two later
                    number = self.base_users + len(self.friends)
                    self.friends.append((min(days - 1, day + rng.randint(1, 2)), user.email))
                    friend = self._identity(number)[3]
                else:
                    friend = f"friend.of.{user.number}@elsewhere.example.com"
                self._emit(user, t, "referral.sent", {"invitee": friend, "channel": "invite-link"})
                referral_day = None

    def _session(self, user: _User, day: int, t: dt.datetime) -> None:
        rng = user.rng
        p = _PROFILE[user.persona]
        user.sessions += 1
        user.last_active_day = day
        self._emit(user, t, "user.identify", {"last_seen_at": _iso(t), "sessions": user.sessions})
        self._emit(user, t + dt.timedelta(seconds=1), "session.started",
                   {"device": rng.choice(DEVICES)})
        # The upsell trigger counts sessions and projects when a session starts, and wants
        # the user in Activation (moved on the day of the first project, so from the next day).
        if (user.engaged_day is None and user.first_project_day is not None
                and day > user.first_project_day and user.sessions >= 4 and user.projects >= 2):
            user.engaged_day = day
        t += dt.timedelta(minutes=rng.randint(1, 15))
        activated = user.first_project_day is not None and day >= user.first_project_day
        if day == user.first_project_day or (activated and day > user.signup_day
                                              and rng.random() < p.project_rate):
            user.projects += 1
            self._emit(user, t, "project.created", {
                "project_id": f"p-{user.number}-{user.projects}",
                "name": rng.choice(PROJECT_NAMES),
                "template": rng.choice(("blank", "kanban", "roadmap", "okr"))})
            t += dt.timedelta(minutes=rng.randint(1, 10))
        for _ in range(rng.randint(0, p.features)):
            self._emit(user, t, "feature.used", {"feature": rng.choice(FEATURES)})
            t += dt.timedelta(minutes=rng.randint(1, 10))

    # ---------------------------------------------------------------- the whole stream

    def run(self) -> DemoStream:
        weights = [1 + 1.5 * d / self.days for d in range(self.days)]
        signup_rng = random.Random(f"{self.seed}:signups")
        signup_days = sorted(signup_rng.choices(range(self.days), weights, k=self.base_users))
        for number, day in enumerate(signup_days):
            user = self._new_user(number, day, None)
            self.users.append(user)
            self.simulate(user)
        done = 0
        while done < len(self.friends):  # friends referred by friends are simulated too
            day, referrer = self.friends[done]
            number = self.base_users + done
            done += 1
            user = self._new_user(number, day, referrer)
            self.users.append(user)
            self.simulate(user)

        by_day: list[list[tuple[dt.datetime, int, dict[str, Any]]]] = [[] for _ in range(self.days)]
        for user in self.users:
            for when, seq, event in user.events:
                by_day[min(self.days - 1, (when - self.start).days)].append((when, seq, event))
        bad = _bad_inputs(self.domain, self.tag)
        bad_days = {self.days * k // (len(bad) + 1): item for k, item in enumerate(bad, 1)}
        phases = [Phase(f"day {d + 1}", tuple(e for _, _, e in sorted(rows, key=lambda r: r[:2])),
                        (bad_days[d],) if d in bad_days else ())
                  for d, rows in enumerate(by_day)]
        # Bad inputs that fall on the same day (few days, many bad inputs) go on day 1.
        leftover = tuple(item for k, item in enumerate(bad, 1)
                         if bad_days.get(self.days * k // (len(bad) + 1)) is not item)
        if leftover:
            phases[0] = Phase(phases[0].name, phases[0].events, phases[0].bad + leftover)

        # The weekly win-back's Monday comes after the last day: the demo runs it then.
        phases.append(Phase("weekly win-back", (), schedule=WIN_BACK_SCHEDULE))

        replies = []
        reply_rng = random.Random(f"{self.seed}:replies")
        for user in self.users:
            quiet = user.last_active_day <= self.days - QUIET_DAYS - 1
            activated = (user.first_project_day is not None
                         and user.first_project_day <= user.last_active_day)
            if quiet and activated and reply_rng.random() < WIN_BACK_REPLY_RATE:
                replies.append({"event_id": self._event_id(user.email, len(user.events) + 1),
                                "event_type": "session.started", "user": user.email,
                                "data": {"device": "web", "campaign": "win-back"}})
        phases.append(Phase("win-back replies", tuple(replies)))
        personas = Counter(u.persona for u in self.users)
        return DemoStream(tag=self.tag, domain=self.domain, seed=self.seed, start=self.start,
                          end=self.end, phases=tuple(phases),
                          personas={name: personas[name] for name, _ in PERSONAS},
                          users=len(self.users), referred=len(self.users) - self.base_users)


@dataclass(frozen=True)
class _Profile:
    activates: bool  # creates a first project 1-3 days after signing up
    active_rate: float  # chance of a visit on a day while active
    active_days: tuple[int, int]  # active for this many days after signing up (a range)
    project_rate: float  # chance of a new project in a session once activated
    features: int  # at most this many feature.used per session
    upgrade_rate: float  # upgrades some days after becoming engaged (the upsell's window)
    direct_upgrade_rate: float  # upgrades on their own, engaged or not
    refer_rate_paid: float
    refer_rate_free: float

    def active_for(self, rng: random.Random, days: int) -> int:
        return rng.randint(*self.active_days) if self.active_days[1] < days else days


_PROFILE: dict[str, _Profile] = {
    "bouncer": _Profile(False, 0.15, (1, 3), 0.0, 1, 0.0, 0.0, 0.0, 0.0),
    "explorer": _Profile(False, 0.35, (5, 10), 0.1, 2, 0.0, 0.0, 0.0, 0.0),
    "casual": _Profile(True, 0.30, (99, 99), 0.2, 2, 0.0, 0.05, 0.3, 0.02),
    "fader": _Profile(True, 0.60, (99, 99), 0.3, 2, 0.0, 0.0, 0.0, 0.0),
    "power": _Profile(True, 0.75, (99, 99), 0.4, 3, 0.5, 0.0, 0.45, 0.05),
}


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([name for name, _ in table], [w for _, w in table])[0]


def _iso(when: dt.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _bad_inputs(domain: str, tag: str) -> list[Any]:
    """Inputs a careless producer sends; each names the run's domain, so it can be found."""
    who = f"someone@{domain}"
    return [
        {"event_type": "User Signed Up", "user": who, "data": {"why": "not dotted lowercase"}},
        {"event_type": "page.viewed", "data": {"path": "/pricing", "site": domain}},  # no user
        {"event_type": "page.viewed", "user": str(uuid.uuid5(NAMESPACE, f"{tag}:ghost")),
         "data": {"site": domain}},  # a user id nobody has
        {"event_type": "page.viewed", "user": f"not-an-email ({domain})", "data": {}},
        {"event_type": "feature.used", "user": who, "data": ["editor", "export"]},
        {"event_type": "session.started", "user": who, "occurred_at": "last tuesday",
         "data": {}},
        {"event_type": "feature.used", "user": who, "data": {"feature": "edit\u0000or"}},
        f'{{"event_type": "project.created", "user": "{who}", "data": {{"name": "Tru',  # cut off
    ]


def generate(users: int = 3000, days: int = 30, seed: int = 7, *,
             end: dt.datetime | None = None, tag: str = "demo") -> DemoStream:
    """The demo's event stream; the same arguments give the same stream."""
    if users < 1 or days < 2:
        raise ValueError("need at least 1 user and 2 days")
    end = end or dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    return _Simulation(users, days, seed, end, tag).run()
