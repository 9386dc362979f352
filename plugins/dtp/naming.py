"""Deterministic resource names and tags from (installation, dag_id, run_id, incarnation).

A retried or cleared task reads the names its run's ``validate_params`` fixed,
so it finds the resource it created before instead of creating a second one,
and a reaper can find every resource of a run by its tags. A whole run cleared
and run again is a new incarnation (Airflow's ``clear_number``) with new names:
it trains again instead of finding its first incarnation's finished job.
The installation's id keeps apart two Airflow installations whose runs share
a dag_id and run_id (every installation's nightly ``scheduled__`` run of a DAG
has the same one): in one account they would take each other's stacks, and
S3 bucket names are global across accounts.

Names are valid everywhere DTP uses them: S3 buckets (3-63 chars, lowercase),
CloudFormation stacks, Slurm job names and POSIX paths; they never contain a
shell metacharacter.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk.types import DagRunProtocol

PREFIX = "dtp"
OWNER = "dtp"
TAG_PREFIX = "dtp:"
# The DAG ids of the regression DAGs generated per recipe (``dtp.pipeline.factory``).
REGRESSION_DAG_PREFIX = "regression__"
EXPIRES_TAG = f"{TAG_PREFIX}expires-at"  # when the reaper may delete a resource (UTC, ISO 8601)
# The installation whose run made a resource: another installation's reaper in the same account leaves it alone
# for a while past its expiry, as it cannot ask this installation whether the run still goes.
INSTALLATION_TAG = f"{TAG_PREFIX}installation"
_EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SAFE = re.compile(r"[^a-z0-9]+")
_TAG_UNSAFE = re.compile(r"[^\w +\-=.:/@]", re.ASCII)
INSTALLATION_VARIABLE = "dtp_installation_id"
# DTP's IAM policies (docs/iam) let it pass only the roles with no path whose name starts with this (they allow
# arn:aws:iam::*:role/dtp-* and deny role/dtp-*/*, as IAM's * matches a / too): on any role, it could hand an admin's
# to an instance it starts.
PASSED_ROLE_PREFIX = f"{PREFIX}-"


def slug(text: str, limit: int) -> str:
    """Lowercase alphanumerics and single hyphens, at most ``limit`` characters."""
    return _SAFE.sub("-", text.lower()).strip("-")[:limit].strip("-") or "x"


@dataclass(frozen=True)
class RunNames:
    """Every name one pipeline run uses, derived from its dag_id, run_id, incarnation (the run's
    ``clear_number`` when its names were fixed: 0 for a run never cleared) and the id of the Airflow
    installation that runs it (``installation_id``)."""

    dag_id: str
    run_id: str
    incarnation: int = 0
    installation: str = ""

    @classmethod
    def from_dag_run(cls, dag_run: DagRunProtocol) -> RunNames:
        """The names of ``dag_run`` as it runs now (its ``clear_number`` is its incarnation) in this installation.
        Callable in a running task only (see ``installation_id``)."""
        return cls(dag_run.dag_id, dag_run.run_id, dag_run.clear_number or 0, installation_id())

    @property
    def run_key(self) -> str:
        key = f"{self.dag_id}\0{self.run_id}" + (f"\0{self.incarnation}" if self.incarnation else "")
        key += f"\0installation={self.installation}" if self.installation else ""  # never read as an incarnation
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return f"{PREFIX}-{slug(self.dag_id, 24)}-{digest}"

    @property
    def network_stack(self) -> str:
        return f"{self.run_key}-network"

    @property
    def data_bucket(self) -> str:
        return f"{self.run_key}-data"

    @property
    def slurm_job(self) -> str:
        return self.run_key

    def earlier(self, count: int) -> list[RunNames]:
        """The names of the incarnations before this one: the first, and the latest ``count`` - 1. What the run had
        before it was cleared whole, which the clear left running when it came while the run ran. Airflow counts
        every clear of a task of the run (``clear_number``), so most numbers named no resource; the first always
        did."""
        numbers = sorted({0, *range(max(0, self.incarnation - count + 1), self.incarnation)} - {self.incarnation})
        return [RunNames(self.dag_id, self.run_id, n, self.installation) for n in numbers]

    def as_dict(self) -> dict[str, str]:
        return {
            "run_key": self.run_key,
            "network_stack": self.network_stack,
            "data_bucket": self.data_bucket,
            "slurm_job": self.slurm_job,
        }


def installation_id() -> str:
    """This Airflow installation's id, from the ``dtp_installation_id`` Variable (or its
    ``AIRFLOW_VAR_DTP_INSTALLATION_ID`` environment variable); the first run of a new installation sets it to a
    random one, and reads it back: of two first runs that both found it unset, the one whose write came first
    takes the other's id (unless it reads before that write lands; its id is still unique to it). Callable in a
    running task only (it may write the Variable)."""
    from airflow.sdk import Variable  # a task-time import: naming is imported where Airflow is not running

    if not (found := Variable.get(INSTALLATION_VARIABLE, default=None)):
        Variable.set(INSTALLATION_VARIABLE, secrets.token_hex(4), description="Keeps this installation's names apart")
        found = Variable.get(INSTALLATION_VARIABLE)  # another first run's, where it set the Variable after this one
    return str(found)


def expiry(hours: float, now: datetime | None = None) -> str:
    """The ISO-8601 UTC instant after which the reaper may delete a resource."""
    now = now or datetime.now(UTC)
    return (now + timedelta(hours=hours)).strftime(_EXPIRY_FORMAT)


def parse_expiry(expires_at: str) -> datetime:
    """The instant ``expiry`` wrote; ValueError when ``expires_at`` is not in its format."""
    return datetime.strptime(expires_at, _EXPIRY_FORMAT).replace(tzinfo=UTC)


def tag_value(text: str) -> str:
    """A tag value every AWS service accepts: letters, digits, spaces and ``+-=._:/@``, at most 256 chars."""
    return _TAG_UNSAFE.sub("_", text)[:256]


def resource_tags(names: RunNames, recipe: str, expires_at: str) -> dict[str, str]:
    """The tags every resource of a run carries (owner, dag, run, recipe, expiry, and the installation where the
    names have one: those of a run always do)."""
    tags = {
        f"{TAG_PREFIX}owner": OWNER,
        f"{TAG_PREFIX}dag": names.dag_id,
        f"{TAG_PREFIX}run": names.run_key,
        f"{TAG_PREFIX}run-id": tag_value(names.run_id),
        f"{TAG_PREFIX}recipe": recipe,
        EXPIRES_TAG: expires_at,
    }
    return tags | ({INSTALLATION_TAG: tag_value(names.installation)} if names.installation else {})


SLURM_EXPIRY_PREFIX = f"{EXPIRES_TAG}="
SLURM_DAG_PREFIX = f"{TAG_PREFIX}dag="
SLURM_INSTALLATION_PREFIX = f"{INSTALLATION_TAG}="
SLURM_RUN_ID_PREFIX = f"{TAG_PREFIX}run-id="
# The fields slurm_comment writes, in order; the installation may hold a space (tag_value keeps one), so it ends at
# the run id's prefix, and the run id, last, takes the rest. The DAG run and the installation are optional: a comment
# written before it named the DAG run carries the expiry alone, one written before it named the installation no
# installation. Slurm refuses a comment of more than 1024 characters; the longest slurm_comment writes has 830 (a
# dag_id and a run_id of Airflow's 250 at most, an installation of tag_value's 256).
_SLURM_COMMENT = re.compile(
    f"{re.escape(SLURM_EXPIRY_PREFIX)}(?P<expires_at>[^ ]*)"
    f"( {re.escape(SLURM_DAG_PREFIX)}(?P<dag_id>[^ ]*)"
    f"( {re.escape(SLURM_INSTALLATION_PREFIX)}(?P<installation>.*?))?"
    f" {re.escape(SLURM_RUN_ID_PREFIX)}(?P<run_id>.*))?",
    re.DOTALL,
)


def slurm_comment(expires_at: str, dag_id: str, run_id: str, installation: str = "") -> str:
    """Slurm jobs have no tags: the expiry, the DAG run whose job it is (the reaper leaves a job of a run still
    running) and the installation that runs it (as ``tag_value`` writes it in the ``dtp:installation`` tag: another
    installation's reaper leaves the job alone for a while past its expiry) travel in the job's comment, where the
    reaper reads them (``parse_slurm_comment``). No installation (names that have none) writes no field for it. The
    run id goes last and whole: a custom one may hold a space."""
    fields = [f"{SLURM_EXPIRY_PREFIX}{expires_at}", f"{SLURM_DAG_PREFIX}{dag_id}"]
    fields += [f"{SLURM_INSTALLATION_PREFIX}{tag_value(installation)}"] if installation else []
    return " ".join([*fields, f"{SLURM_RUN_ID_PREFIX}{run_id}"])


def parse_slurm_comment(comment: str) -> tuple[str, str, str, str]:
    """``(expires_at, dag_id, run_id, installation)`` from a job's comment: empty strings for what it does not carry
    (a comment written before it named the installation carries none, and the reaper counts its job as its own
    installation's; one written before it named the DAG run carries the expiry alone; one DTP did not write,
    nothing)."""
    if not (fields := _SLURM_COMMENT.match(comment)):
        return "", "", "", ""
    expires_at, dag_id, run_id, installation = fields.group("expires_at", "dag_id", "run_id", "installation")
    return expires_at, dag_id or "", run_id or "", installation or ""


def aws_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """``tags`` as the ``[{"Key": ..., "Value": ...}]`` list most AWS APIs take, in key order."""
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def tags_dict(tags: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The reverse of ``aws_tags``: an AWS ``[{"Key": ..., "Value": ...}]`` list as a dict."""
    return {t["Key"]: t["Value"] for t in tags}


def passed_role_name(arn: str) -> str:
    """The path and name of the role or instance profile ``arn`` (``service-role/x`` of ``...:role/service-role/x``)."""
    return arn.split(":", 5)[-1].partition("/")[2]


def passed_role_problem(arn: str) -> str | None:
    """What keeps DTP's IAM policies from letting it pass the role or instance profile ``arn``, said of its name
    (``passed_role_name``); None when nothing does. A path is refused even where it starts with the prefix
    (``dtp-ops/Admin``: a role ``Admin`` on the path ``/dtp-ops/``)."""
    name = passed_role_name(arn)
    if name.startswith(PASSED_ROLE_PREFIX) and "/" not in name:
        return None
    return f"must start with {PASSED_ROLE_PREFIX!r}, with no path"
