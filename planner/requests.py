"""What the Planner's requests must look like: ids, addresses, numbers, constraints and profiles.

Every check raises :class:`runtime.contracts.errors.InvalidInput` (INVALID_ARGUMENT on the wire) with a
message a person can act on. Checks that need the planner's state (capacity limits, which
workers are registered) stay in :mod:`planner.service`, between these, in the same order as
before, so a request with several faults is answered with the same one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from planner import wirebytes
from planner.config import PlannerConfig
from runtime.contracts import constraints
from runtime.contracts import profile as profiles
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile, ProfileCache
from runtime.contracts.tiers import DEVICE, EDGE, WORKER_TIERS
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

MAX_ID_CHARS = 128
MAX_LIST = 256  # workers, TL ids or excluded workers one request may name
MAX_MESSAGE_CHARS = 4096
MAX_STAGES = 1024  # stage medians one telemetry message may carry
MAX_LINK_AGE_SECONDS = 30 * 86400.0  # oldest bandwidth estimate a telemetry message may report (an agent up a month)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def check_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):  # fullmatch: '$' alone lets a trailing newline through
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidInput(f"{what} {shown!r} is not a valid id: 1-{MAX_ID_CHARS} characters of letters, digits and "
                           f"._:@- starting with a letter or digit")
    return value


def check_ids(values: Sequence[str], what: str) -> tuple[str, ...]:
    if len(values) > MAX_LIST:
        raise InvalidInput(f"{len(values)} {what} is more than the {MAX_LIST} one request may name")
    out = tuple(check_id(v, what.rstrip("s")) for v in values)
    if len(set(out)) != len(out):
        raise InvalidInput(f"{what} repeat: {list(out)}")
    return out


# A worker address is pushed to the agents, which dial it, and logged: a host name, an IPv4 address or a bracketed
# IPv6 one (with a zone), or a unix: socket path of printable characters without spaces.
_HOST = re.compile(r"^(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?\])$")
_SOCKET = re.compile(r"^unix:[\x21-\x7e]{1,251}$")


def check_address(address: str) -> str:
    if address.startswith("unix:") and _SOCKET.fullmatch(address):
        return address
    host, _, port = address.rpartition(":")
    if (not host or len(address) > 256 or not _HOST.fullmatch(host) or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536):
        raise InvalidInput(f"worker address {address[:80]!r} is not HOST:PORT (or unix:/path.sock): give the address "
                           "agents dial, e.g. 10.0.0.5:50051")
    return address


def check_seconds(value: float, what: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidInput(f"{what} must be a finite number >= 0, not {value}")
    return value


def check_constraints(c: pb.Constraints, device: Profile) -> None:
    """Every field of ``c``, the blocks it names against the agent's ``device`` profile."""
    check_ids(c.exclude_workers, "constraints.exclude_workers")
    check_ids(c.include_workers, "constraints.include_workers")
    constraints.resolve(c, device)


# -- registrations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRequest:
    worker_id: str
    address: str
    tier: str
    tl_ids: tuple[str, ...]
    next_tiers: tuple[str, ...] = ()  # addresses it forwards chained frames to


def check_next_tiers(values: Sequence[str]) -> tuple[str, ...]:
    """A worker's --next-tier allowlist: HOST:PORT addresses, each once."""
    if len(values) > MAX_LIST:
        raise InvalidInput(f"{len(values)} next_tiers is more than the {MAX_LIST} one request may name")
    out = tuple(check_address(v) for v in values)
    if len(set(out)) != len(out):
        raise InvalidInput(f"next_tiers repeat: {list(out)}")
    return out


def check_worker_request(request: pb.RegisterWorkerRequest, config: PlannerConfig) -> WorkerRequest:
    """Everything about a RegisterWorker but its profiles (parsed by :func:`parse_worker_profiles`)."""
    wid = check_id(request.worker_id, "worker_id")
    address = check_address(request.address)
    tier = request.tier or EDGE
    if tier not in WORKER_TIERS:
        raise InvalidInput(f"tier must be one of {', '.join(WORKER_TIERS)}, not {request.tier[:40]!r}")
    n = len(request.profiles_json)
    if n == 0:
        raise InvalidInput(f"worker {wid} sent no profiles: profile each model it serves ('edgesplit profile') and "
                           "send the documents in profiles_json")
    if n > config.max_profiles_per_worker:
        raise InvalidInput(f"{n} profiles is more than the {config.max_profiles_per_worker} a worker may "
                           "register (planner setting max_profiles_per_worker)")
    return WorkerRequest(wid, address, tier, check_ids(request.tl_ids, "tl_ids"), check_next_tiers(request.next_tiers))


def _loads(text: str, where: str, cache: ProfileCache | None, key: bytes | None = None) -> Profile:
    return cache.loads(text, where, key) if cache is not None else profiles.loads(text, where)


def parse_worker_profiles(worker_id: str, texts: list[str], cache: ProfileCache | None = None) -> dict[str, Profile]:
    """model -> profile, each renamed to machine ``worker_id`` (the name the search links by); ``cache``:
    documents seen before are not parsed again."""
    out: dict[str, Profile] = {}
    for i, text in enumerate(texts):
        p = _loads(text, f"profiles_json[{i}]", cache)
        if p.role == DEVICE:
            raise InvalidInput(f"profiles_json[{i}] ({p.model}) was measured as a device (role {DEVICE!r}); a worker "
                               f"registers profiles measured on itself, with role {' or '.join(WORKER_TIERS)}")
        if p.model in out:
            raise InvalidInput(f"profiles_json[{i}]: a second profile of {p.model}; send one profile per model")
        out[p.model] = dataclasses.replace(p, machine=worker_id) if p.machine != worker_id else p
    return out


@dataclass(frozen=True)
class AgentRequest:
    agent_id: str
    model: str
    device: Profile
    workers: tuple[str, ...]
    tl_ids: tuple[str, ...]


def check_agent_request(request: pb.RegisterAgentRequest, cache: ProfileCache | None = None,
                        text: str | None = None, key: bytes | None = None) -> AgentRequest:
    """A RegisterAgent's ids, its device profile (of the model it names, with the same weights; ``cache``:
    a document seen before is not parsed again) and its constraints. ``text``/``key``: the profile
    document (default ``request.profile_json``) and its ProfileCache key, when the caller has them
    (a registration that named its profile by hash; a key already computed)."""
    aid = check_id(request.agent_id, "agent_id")
    model = request.model_id
    if not model or len(model) > MAX_ID_CHARS:
        raise InvalidInput(f"model_id must be 1-{MAX_ID_CHARS} characters (the model the agent runs)")
    if len(request.model_digest) > MAX_ID_CHARS:
        raise InvalidInput(f"model_digest is longer than {MAX_ID_CHARS} characters")
    device = _loads(request.profile_json if text is None else text, "profile_json", cache, key)
    if device.role != DEVICE:
        raise InvalidInput(f"profile_json was measured as role {device.role!r}; an agent registers the profile "
                           "measured on its own board (role device)")
    if device.model != model:
        raise InvalidInput(f"profile_json is a profile of {device.model!r} but model_id is {model!r}: send the "
                           "profile of the model this agent runs")
    if request.model_digest and device.model_digest and request.model_digest != device.model_digest:
        raise InvalidInput(f"profile_json was measured with weights {device.model_digest} but model_digest is "
                           f"{request.model_digest}: re-profile the board with the weights it runs")
    workers = check_ids(request.workers, "workers")
    tl_ids = check_ids(request.tl_ids, "tl_ids")
    check_constraints(request.constraints, device)
    return AgentRequest(aid, model, device, workers, tl_ids)


# -- measurements and status -------------------------------------------------------------------------


def check_telemetry(t: pb.Telemetry) -> tuple[float, float]:
    """``(bandwidth, rtt)`` of one telemetry message, after checking every number in it."""
    bw = check_seconds(t.bandwidth_bytes_per_second, "bandwidth_bytes_per_second")
    rtt = check_seconds(t.rtt_seconds, "rtt_seconds")
    if not math.isfinite(t.sent_unix):
        raise InvalidInput("sent_unix must be a finite time")
    if len(t.other_links) > MAX_LIST:
        raise InvalidInput(f"other_links holds at most {MAX_LIST} links")
    for lk in (t, *t.other_links):
        check_seconds(lk.bandwidth_bytes_per_second, "bandwidth_bytes_per_second")
        check_seconds(lk.rtt_seconds, "rtt_seconds")
        if not (math.isfinite(lk.bandwidth_age_seconds) and 0 <= lk.bandwidth_age_seconds <= MAX_LINK_AGE_SECONDS):
            raise InvalidInput(f"bandwidth_age_seconds must be a finite number of seconds in [0, {MAX_LINK_AGE_SECONDS:g}]")
    if any(len(lk.worker) > MAX_MESSAGE_CHARS for lk in t.other_links):
        raise InvalidInput(f"a link's worker is at most {MAX_MESSAGE_CHARS} characters")
    if len(t.stage_seconds) > MAX_STAGES or not all(math.isfinite(v) and v >= 0 for v in t.stage_seconds.values()):
        raise InvalidInput(f"stage_seconds holds at most {MAX_STAGES} stages, each a finite number of seconds >= 0")
    wirebytes.check(t)  # measured bytes per frame and encode times (issue 11)
    return bw, rtt


def check_plan_status(request: pb.PlanStatus) -> None:
    if request.version == 0:
        raise InvalidInput("version must name a plan (> 0)")
    if len(request.message) > MAX_MESSAGE_CHARS:
        raise InvalidInput(f"message is longer than {MAX_MESSAGE_CHARS} characters")


def check_query(request: pb.PlanQuery, config: PlannerConfig, device: Profile) -> tuple[int, float, float]:
    """``(top_n, bandwidth, rtt)`` of a QueryPlan (0 for bandwidth or RTT: the measured one); its
    constraints, when set, are checked against the agent's ``device`` profile."""
    top_n = request.top_n or config.top_n
    if top_n > config.max_top_n:
        raise InvalidInput(f"top_n {top_n} is above the planner's max_top_n ({config.max_top_n})")
    if request.HasField("constraints"):
        check_constraints(request.constraints, device)
    return (top_n, check_seconds(request.bandwidth_bytes_per_second, "bandwidth_bytes_per_second"),
            check_seconds(request.rtt_seconds, "rtt_seconds"))
