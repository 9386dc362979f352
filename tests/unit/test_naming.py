"""dtp.naming: deterministic, collision-free names that are valid S3 buckets and CloudFormation stacks."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from dtp.naming import (
    INSTALLATION_TAG,
    INSTALLATION_VARIABLE,
    RunNames,
    aws_tags,
    expiry,
    installation_id,
    parse_expiry,
    parse_slurm_comment,
    passed_role_name,
    passed_role_problem,
    resource_tags,
    slug,
    slurm_comment,
    tags_dict,
)

# S3 general purpose bucket rules (without dots, which DTP never uses).
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
S3_FORBIDDEN_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
S3_FORBIDDEN_SUFFIXES = ("-s3alias", "--ol-s3", "--x-s3", "--table-s3")
CFN_STACK = re.compile(r"^[A-Za-z][-A-Za-z0-9]{0,127}$")
# slurmctld refuses a job whose comment is longer.
SLURM_COMMENT_LIMIT = 1024
SHELL_META = set("'\"`$;&|<>()\\ \t\n*?[]{}!#~")
# S3 object/bucket tagging: letters, digits, spaces and + - = . _ : / @, at most 256 characters.
S3_TAG_VALUE = re.compile(r"^[\w\s+\-=.:/@]{0,256}$", re.ASCII)

HOSTILE_RUN_IDS = [
    "manual__2026-01-01T00:00:00+00:00",
    "scheduled__2026-01-01T00:00:00+00:00",
    "x; rm -rf /",
    "$(touch /tmp/p)",
    "`id`",
    "../../etc/passwd",
    "Ünïcödé-ラン-🚀",
    "\0\n\t",
    "",
    "-",
    "A" * 500,
    "x" * 500,
]
HOSTILE_DAG_IDS = ["train_e2e", "TRAIN.E2E", "a", "-", "---", "日本語", "dag" * 100, "xn--abc", "x-s3alias"]


def assert_valid_bucket(name: str) -> None:
    assert 3 <= len(name) <= 63, name
    assert S3_BUCKET.match(name), name
    assert "--" not in name, name
    assert not name.startswith(S3_FORBIDDEN_PREFIXES), name
    assert not name.endswith(S3_FORBIDDEN_SUFFIXES), name


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS)
@pytest.mark.parametrize("dag_id", HOSTILE_DAG_IDS)
def test_every_name_is_a_valid_bucket_stack_and_job_name(dag_id: str, run_id: str) -> None:
    names = RunNames(dag_id, run_id)
    for name in (names.run_key, names.data_bucket, names.network_stack, names.slurm_job):
        assert_valid_bucket(name)
        assert CFN_STACK.match(name), name
        assert not SHELL_META & set(name), name
        assert name.isascii()


def test_run_key_is_deterministic() -> None:
    # A fixed input gives a fixed key across processes and releases: a retry after an upgrade, and the
    # reaper, must find the resources created before (sha256 of "dag_id\0run_id", first 10 hex digits).
    assert RunNames("train_e2e", "manual__2026-01-01T00:00:00+00:00").run_key == "dtp-train-e2e-718cc1c5b8"


def test_a_cleared_run_is_a_new_incarnation_with_new_names() -> None:
    # A whole run cleared and run again must not find its first incarnation's finished job or stack; a run
    # never cleared (clear_number 0) keeps the names it always had.
    first = RunNames("train_e2e", "scheduled__2026-01-01T00:00:00+00:00")
    again = [RunNames(first.dag_id, first.run_id, n) for n in (1, 2)]
    assert first == RunNames(first.dag_id, first.run_id, 0)
    assert len({first.run_key, *(names.run_key for names in again)}) == 3
    assert all(names.run_key.startswith("dtp-train-e2e-") for names in again)


def test_two_installations_name_the_same_run_apart() -> None:
    # Every installation's nightly run of a DAG has the same run_id: in one account the second would take the
    # first's stack, and S3 bucket names are global across accounts.
    run = ("regression__llama3_2_1b", "scheduled__2026-12-06T00:00:00+00:00")
    names = [RunNames(*run, installation=i) for i in ("", "0a1b2c3d", "4e5f6a7b")]
    assert len({n.data_bucket for n in names}) == len({n.network_stack for n in names}) == 3
    assert all(S3_BUCKET.match(n.data_bucket) and CFN_STACK.match(n.network_stack) for n in names)
    assert RunNames(*run, 1, "0a1b2c3d") not in names


def test_the_installation_id_is_read_from_its_variable(monkeypatch) -> None:
    # Airflow reads a Variable from AIRFLOW_VAR_<KEY> before its database: the way to pin an installation's id.
    monkeypatch.setenv(f"AIRFLOW_VAR_{INSTALLATION_VARIABLE.upper()}", "pinned01")
    assert installation_id() == "pinned01"


def test_earlier_incarnations_are_the_first_and_the_latest_with_this_installations_names() -> None:
    # Airflow counts every task clear: names fixed at 0, three tasks cleared, then the whole run (4). The first
    # always made resources; of the others, only those a whole-run clear started.
    run = ("train_e2e", "manual__2026-12-07T00:00:00+00:00")
    assert RunNames(*run, 0, "0a1b2c3d").earlier(3) == []
    assert RunNames(*run, 9, "0a1b2c3d").earlier(3) == [RunNames(*run, n, "0a1b2c3d") for n in (0, 7, 8)]
    assert RunNames(*run, 2).earlier(3) == [RunNames(*run, 0), RunNames(*run, 1)]
    assert RunNames(*run, 1).earlier(3)[0].run_key == RunNames(*run).run_key


def test_an_installation_id_is_never_read_as_an_incarnation() -> None:
    run = ("train_e2e", "manual__2026-12-07T00:00:00+00:00")
    assert RunNames(*run, 0, "1").run_key != RunNames(*run, 1).run_key


def test_different_runs_get_different_keys() -> None:
    run_ids = [f"manual__2026-01-{d:02d}T00:00:00+00:00" for d in range(1, 29)] + HOSTILE_RUN_IDS
    keys = {RunNames("train_e2e", r).run_key for r in run_ids}
    assert len(keys) == len(set(run_ids))


def test_dag_ids_that_slug_alike_still_differ() -> None:
    # "train.e2e", "train_e2e" and "TRAIN-E2E" share a slug; the hash of the full dag_id keeps them apart.
    keys = {RunNames(d, "r1").run_key for d in ("train.e2e", "train_e2e", "TRAIN-E2E")}
    assert len(keys) == 3
    assert all(k.startswith("dtp-train-e2e-") for k in keys)


def test_as_dict_names_every_resource() -> None:
    names = RunNames("train_e2e", "r1")
    d = names.as_dict()
    assert d == {
        "run_key": names.run_key,
        "network_stack": f"{names.run_key}-network",
        "data_bucket": f"{names.run_key}-data",
        "slurm_job": names.run_key,
    }


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("Train_E2E", 24, "train-e2e"),
        ("--a--b--", 24, "a-b"),
        ("abc-def", 4, "abc"),  # cut at the limit, then the trailing hyphen is stripped
        ("!!!", 10, "x"),
        ("", 10, "x"),
    ],
)
def test_slug(text: str, limit: int, expected: str) -> None:
    assert slug(text, limit) == expected


def test_expiry_is_iso_utc_hours_ahead() -> None:
    now = datetime(2026, 1, 1, 23, 30, tzinfo=UTC)
    assert expiry(1, now) == "2026-01-02T00:30:00Z"
    assert expiry(0.5, now) == "2026-01-02T00:00:00Z"
    assert expiry(24 * 30, now) == "2026-01-31T23:30:00Z"


def test_expiry_defaults_to_now() -> None:
    # The call's own now lies between the two read around it; the stamp drops the second's fraction.
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = parse_expiry(expiry(2))
    after = datetime.now(UTC)
    assert before + timedelta(hours=2) <= stamp <= after + timedelta(hours=2)


def test_resource_tags() -> None:
    names = RunNames("train_e2e", "manual__2026-01-01T00:00:00+00:00")
    tags = resource_tags(names, "tiny", "2026-01-02T00:00:00Z")
    assert tags == {
        "dtp:owner": "dtp",
        "dtp:dag": "train_e2e",
        "dtp:run": names.run_key,
        "dtp:run-id": "manual__2026-01-01T00:00:00+00:00",
        "dtp:recipe": "tiny",
        "dtp:expires-at": "2026-01-02T00:00:00Z",
    }
    assert aws_tags(tags) == [{"Key": k, "Value": tags[k]} for k in sorted(tags)]
    assert tags_dict(aws_tags(tags)) == tags


def test_resource_tags_name_the_installation_of_the_run() -> None:
    # Another installation's reaper in the same account tells them from its own runs' by it.
    names = RunNames("train_e2e", "scheduled__2026-01-01T00:00:00+00:00", installation="0a1b2c3d")
    tags = resource_tags(names, "tiny", "2026-01-02T00:00:00Z")
    assert tags["dtp:installation"] == "0a1b2c3d"
    assert tags == resource_tags(RunNames(names.dag_id, names.run_id), "tiny", "2026-01-02T00:00:00Z") | {
        "dtp:installation": "0a1b2c3d",
        "dtp:run": names.run_key,
    }


def test_parse_expiry_reads_what_expiry_writes() -> None:
    now = datetime(2026, 1, 1, 23, 30, tzinfo=UTC)
    assert parse_expiry(expiry(1, now)) == now + timedelta(hours=1)
    with pytest.raises(ValueError):
        parse_expiry("2026-01-02 00:30")


def test_resource_tags_are_valid_s3_tags_for_airflow_generated_run_ids() -> None:
    names = RunNames("train_e2e", "manual__2026-01-01T00:00:00+00:00")
    for key, value in resource_tags(names, "tiny", expiry(24)).items():
        assert S3_TAG_VALUE.match(key), key
        assert S3_TAG_VALUE.match(value), value


@pytest.mark.parametrize(
    "run_id",
    # Airflow's default allowed_run_id_pattern is ^[A-Za-z0-9_.~:+-]+$: each of its characters, and the shapes of
    # the run ids the scheduler, the UI and backfills make.
    ["manual~retry", "scheduled__2026-01-01T00:00:00+00:00", "backfill__2026-01-01T00:00:00+00:00", "a.b_c-d:e+f~g"],
)
def test_resource_tags_are_valid_s3_tags_for_every_run_id_airflow_accepts(run_id: str) -> None:
    tags = resource_tags(RunNames("train_e2e", run_id), "tiny", expiry(24))
    assert all(S3_TAG_VALUE.match(v) for v in tags.values()), tags


@pytest.mark.parametrize("run_id", ["manual__2026-12-01T00:00:00+00:00", "nightly run ~ with spaces|and a pipe"])
@pytest.mark.parametrize("installation", ["0a1b2c3d", "prod eu", "staging dtp:dag=x"])
def test_a_slurm_comment_names_the_dag_run_whose_job_it_is_and_its_installation(run_id: str, installation: str) -> None:
    comment = slurm_comment("2026-12-01T00:00:00Z", "train_e2e", run_id, installation)
    assert parse_slurm_comment(comment) == ("2026-12-01T00:00:00Z", "train_e2e", run_id, installation)


def test_a_slurm_comment_holds_the_installation_as_its_tag_does() -> None:
    # The reaper compares it with its own installation's tag_value, as it does a resource's tag.
    names = RunNames("train_e2e", "manual__1", installation="prod#eu\n")
    comment = slurm_comment("2026-12-01T00:00:00Z", "train_e2e", "manual__1", names.installation)
    tags = resource_tags(names, "tiny", "2026-12-01T00:00:00Z")
    assert parse_slurm_comment(comment)[3] == tags[INSTALLATION_TAG] == "prod_eu_"


def test_the_longest_slurm_comment_is_within_slurms_limit() -> None:
    # Airflow's ids are at most 250 characters (ID_LEN); tag_value cuts an installation's at 256.
    dag_id, run_id, installation = "d" * 250, "r" * 250, "i" * 300
    comment = slurm_comment(expiry(24), dag_id, run_id, installation)
    assert len(comment) <= SLURM_COMMENT_LIMIT
    assert parse_slurm_comment(comment)[1:] == (dag_id, run_id, "i" * 256)


def test_a_slurm_comment_of_a_run_without_an_installation_is_as_before() -> None:
    comment = slurm_comment("2026-12-01T00:00:00Z", "train_e2e", "manual__1")
    assert comment == "dtp:expires-at=2026-12-01T00:00:00Z dtp:dag=train_e2e dtp:run-id=manual__1"


def test_an_older_slurm_comment_still_gives_what_it_carries_and_another_comment_nothing() -> None:
    # Written before comments named the installation: the reaper counts its job as its own installation's.
    before = "dtp:expires-at=2026-12-01T00:00:00Z dtp:dag=train_e2e dtp:run-id=nightly run"
    assert parse_slurm_comment(before) == ("2026-12-01T00:00:00Z", "train_e2e", "nightly run", "")
    assert parse_slurm_comment("dtp:expires-at=2026-12-01T00:00:00Z") == ("2026-12-01T00:00:00Z", "", "", "")
    assert parse_slurm_comment("dtp:expires-at=2026-12-01T00:00:00Z by hand") == ("2026-12-01T00:00:00Z", "", "", "")
    assert parse_slurm_comment("dtp:expires-at=2026-12-01T00:00:00Z dtp:dag=train_e2e") == (
        "2026-12-01T00:00:00Z",
        "",
        "",
        "",
    )
    assert parse_slurm_comment("my experiment") == ("", "", "", "")
    assert parse_slurm_comment("") == ("", "", "", "")


@pytest.mark.parametrize(
    ("arn", "name", "passable"),
    [
        ("arn:aws:iam::123456789012:role/dtp-hyperpod-exec", "dtp-hyperpod-exec", True),
        ("arn:aws:iam::123456789012:instance-profile/dtp-batch-instance", "dtp-batch-instance", True),
        ("arn:aws:iam::123456789012:role/hyperpod-execution", "hyperpod-execution", False),
        ("arn:aws:iam::123456789012:role/service-role/dtp-batch", "service-role/dtp-batch", False),
        # a role Admin on the path /dtp-ops/: its path and name start with dtp-, but it is no DTP role
        ("arn:aws:iam::123456789012:role/dtp-ops/Admin", "dtp-ops/Admin", False),
        ("arn:aws:iam::123456789012:instance-profile/dtp-ops/dtp-batch", "dtp-ops/dtp-batch", False),
    ],
)
def test_only_a_dtp_name_with_no_path_may_be_passed(arn: str, name: str, passable: bool) -> None:
    assert passed_role_name(arn) == name
    assert passed_role_problem(arn) == (None if passable else "must start with 'dtp-', with no path")
