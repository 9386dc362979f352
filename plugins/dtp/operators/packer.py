"""Bake an AMI with Packer: one build per task, found again instead of baked twice."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from dtp.hooks.ami import AmiHook
from dtp.hooks.packer import PackerError, PackerHook, fingerprint
from dtp.naming import EXPIRES_TAG, expiry, parse_expiry, tags_dict


class PackerBuildOperator(BaseOperator):
    """
    Build an amazon-ebs Packer template and return the AMI it made.

    The AMI name is ``<name_prefix>-<fingerprint>``, the fingerprint covering the
    template's directory (template, var files, playbooks, roles), every
    variable and, given ``source_ami``, the id of the newest source AMI. A
    retry, or a second run with the same inputs, finds that AMI and returns it
    without building; changing any version variable or file, or a newer source
    AMI, gives a new name and a new AMI. An AMI of that name still ``pending`` (an earlier
    try was killed after packer's CreateImage) is waited for with EC2's
    ``image_available`` waiter and then returned (baked again if it is deregistered
    meanwhile: the killed try's packer cleaning up). One that is ``disabled`` was
    taken out of use on purpose: the task fails without baking, saying how to
    enable it or free its name. One that is, or turns out, anything else but
    ``available`` (``failed``, ``error``, ``invalid``...) is deregistered, its
    snapshots deleted, and the AMI baked again (packer would refuse the taken
    name). ``built`` is False when no bake was needed. The AMI
    and its snapshots get ``tags`` every time, but an AMI found again keeps its
    own ``dtp:expires-at`` where that is later (a bake kept longer stays so).
    Packer's UI lines stream into the task log; killing the task interrupts
    packer (which cleans up its instance) and then kills its process tree.

    :param template: path of the ``.pkr.hcl`` template
    :param var_file: ``.pkrvars.hcl`` file passed with ``-var-file``
    :param variables: template variables (``-var``), e.g. component versions
    :param name_prefix: start of the AMI name
    :param fingerprint_paths: files and folders the AMI depends on besides the template and
        var file (playbooks, roles); default: the template's folder
    :param name_variable: the template variable that receives the AMI name
    :param tags: tags for the AMI and its snapshots
    :param tags_variable: the template's map variable that also takes ``tags`` (not part of the fingerprint), so
        packer tags the AMI and its snapshots as it makes them: a worker that dies before the task tags them
        leaves nothing the reaper cannot find; None passes nothing
    :param builder_tags: tags for the builder instance and its volumes, passed as the template's
        ``builder_tags`` map variable (not part of the fingerprint), so an instance packer could not
        delete can be found; None passes nothing
    :param source_ami: the template's source AMI filter, ``{"name": <pattern>, "owner": <account>}``: the id of
        the newest AMI it matches goes into the fingerprint, so a new source AMI (security fixes) gives a new
        AMI name and a bake, where the same inputs otherwise reuse the AMI; None leaves it out
    :param builder_expiry_hours: when set, the builder's ``dtp:expires-at`` tag is this many hours after the
        build starts (not after the run did: a bake retried hours later would be reaped while it bakes)
    :param aws_conn_id: AWS connection (credentials, region, emulator endpoint)
    :param packer_path: the packer executable
    :param waiter_delay: seconds between checks of a pending AMI
    :param waiter_max_attempts: checks of a pending AMI before the task fails
    """

    template_fields: Sequence[str] = (
        "template",
        "var_file",
        "variables",
        "name_prefix",
        "tags",
        "builder_tags",
        "fingerprint_paths",
        "source_ami",
    )
    ui_color = "#02a8ef"

    def __init__(
        self,
        *,
        template: str,
        name_prefix: str,
        var_file: str | None = None,
        variables: dict[str, str] | None = None,
        fingerprint_paths: list[str] | None = None,
        name_variable: str = "ami_name",
        tags: dict[str, str] | None = None,
        tags_variable: str | None = None,
        builder_tags: dict[str, str] | None = None,
        builder_expiry_hours: float | None = None,
        source_ami: dict[str, str] | None = None,
        aws_conn_id: str | None = "aws_default",
        packer_path: str = "packer",
        waiter_delay: int = 15,
        waiter_max_attempts: int = 120,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.template = template
        self.var_file = var_file
        self.variables = variables or {}
        self.name_prefix = name_prefix
        self.fingerprint_paths = fingerprint_paths
        self.name_variable = name_variable
        self.tags = tags or {}
        self.tags_variable = tags_variable
        self.builder_tags = builder_tags
        self.builder_expiry_hours = builder_expiry_hours
        self.source_ami = source_ami
        self.aws_conn_id = aws_conn_id
        self.packer_path = packer_path
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def hook(self) -> PackerHook:
        """The hook that runs packer."""
        return PackerHook(aws_conn_id=self.aws_conn_id, packer_path=self.packer_path)

    @property
    def ami_hook(self) -> AmiHook:
        """The hook that finds, tags and deregisters the AMIs."""
        return AmiHook(aws_conn_id=self.aws_conn_id)

    def ami_name(self, amis: AmiHook) -> str:
        """The name of the AMI these inputs make: ``<name_prefix>-<fingerprint>``."""
        template = Path(self.template)
        var_file = [Path(self.var_file)] if self.var_file else []
        inputs = [Path(p) for p in self.fingerprint_paths] if self.fingerprint_paths else [template.parent]
        return f"{self.name_prefix}-{fingerprint([template, *var_file, *inputs], self._fingerprinted(amis))}"

    def execute(self, context: Any) -> dict[str, Any]:
        hook, amis = self.hook, self.ami_hook
        template = Path(self.template)
        var_file = Path(self.var_file) if self.var_file else None
        name = self.ami_name(amis)
        variables = {**self.variables, self.name_variable: name}

        existing = amis.find_image(name)
        if existing and existing["State"] == "disabled":
            raise AirflowFailException(
                f"AMI {name} ({existing['ImageId']}) has these inputs but is disabled: enable it to use it again "
                f"(aws ec2 enable-image --image-id {existing['ImageId']}), or deregister it to bake a new one"
            )
        if existing and existing["State"] in ("pending", "transient"):
            self.log.info(
                "AMI %s (%s) of an earlier try is still being made: waiting for it", name, existing["ImageId"]
            )
            image_id = existing["ImageId"]
            existing = amis.wait_available(image_id, self.waiter_delay, self.waiter_max_attempts)
            if existing is None:
                self.log.warning("AMI %s (%s) of an earlier try is gone (deregistered): baking again", name, image_id)
        if existing and existing["State"] != "available":
            self.log.warning(
                "AMI %s (%s) of an earlier try is %s: deregistering it and baking again",
                name,
                existing["ImageId"],
                existing["State"],
            )
            amis.deregister_image(existing["ImageId"])
            existing = None
        if existing:
            image_id, built, tags = existing["ImageId"], False, self._tags_keeping_expiry(existing)
            self.log.info("AMI %s already exists as %s (same template and inputs): not baking again", name, image_id)
        else:
            if self.builder_tags is not None:
                variables["builder_tags"] = json.dumps(self._builder_tags())  # JSON is HCL's map syntax too
            if self.tags_variable:
                variables[self.tags_variable] = json.dumps(self.tags)
            hook.validate(template, var_file, variables)
            self.log.info("Baking %s with packer (source %s)", name, hook.source)
            with tempfile.TemporaryDirectory(prefix="dtp-packer-") as tmp:
                output = Path(tmp) / "packer.log"
                process = self._process = hook.start_build(template, var_file, variables, output)
                try:
                    result = hook.follow(process, output, lambda message: self.log.info("packer: %s", message))
                finally:
                    self._process = None
            region_amis = result.amis()
            if len(region_amis) != 1:
                raise PackerError(f"expected one AMI from the build, packer reported {result.artifacts}")
            image_id, built, tags = next(iter(region_amis.values())), True, self.tags
        amis.tag_image(image_id, tags)
        return {
            "ami_id": image_id,
            "ami_name": name,
            "built": built,
            "source": hook.source,
            "variables": self.variables,
        }

    def _fingerprinted(self, amis: AmiHook) -> dict[str, str]:
        """The variables, and the source AMI's id when a filter is given."""
        if self.source_ami is None:
            return self.variables
        source = amis.newest_image(self.source_ami["name"], self.source_ami["owner"])
        self.log.info("Source AMI: %s (the newest %s of %s)", source, self.source_ami["name"], self.source_ami["owner"])
        return {**self.variables, "source_ami_id": source or "none"}

    def _tags_keeping_expiry(self, image: dict[str, Any]) -> dict[str, str]:
        """``tags`` for an AMI found again, but keeping the AMI's own expiry where it is later: reusing an AMI
        baked to be kept longer (a larger retain_days) must not shorten its life, nor how far back a backfill
        can reach for it."""
        kept, new = tags_dict(image.get("Tags", [])).get(EXPIRES_TAG), self.tags.get(EXPIRES_TAG)
        if kept is None or new is None or not _later(kept, new):
            return self.tags
        self.log.info("AMI %s keeps its later expiry %s (this run's: %s)", image["ImageId"], kept, new)
        return {**self.tags, EXPIRES_TAG: kept}

    def _builder_tags(self) -> dict[str, str]:
        if self.builder_expiry_hours is None:
            return dict(self.builder_tags or {})
        return {**(self.builder_tags or {}), EXPIRES_TAG: expiry(self.builder_expiry_hours)}

    def on_kill(self) -> None:
        if self._process is not None:
            self.log.info("Stopping packer (pid %s) and its children", self._process.pid)
            PackerHook.stop(self._process)


def _later(expires_at: str, than: str) -> bool:
    """Whether the expiry ``expires_at`` is after ``than``; False when either is no expiry ``expiry`` wrote."""
    try:
        return parse_expiry(expires_at) > parse_expiry(than)
    except ValueError:
        return False
