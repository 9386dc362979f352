"""The ``dtp_batch`` connection's settings: the account's AWS Batch roles, launch template, image and limits, and
the roles' names the worker policy lets DTP pass."""

from __future__ import annotations

from pydantic import Field

from dtp.naming import PASSED_ROLE_PREFIX, passed_role_name, passed_role_problem
from dtp.platforms.base import PlatformSettings
from dtp.platforms.containers import ngc_pytorch_image

# How long a compute environment or queue may take to settle or go, unless the connection says otherwise.
WAIT_TIMEOUT_MINUTES = 30


class BatchSettings(PlatformSettings):
    """the account's Batch settings: instance_role_arn, launch_template_id and optional service_role_arn, image

    The launch template (``check`` refuses every job without one) mounts FSx for Lustre at /fsx on each host and
    holds one network interface of InterfaceType efa per EFA interface of the instance type; those interfaces must
    carry the run's EFA security group (the ``dtp_network`` connection's ``security_group``): for an instance type
    with EFA interfaces the compute environment sets no security groups of its own, since EC2 refuses
    instance-level security groups together with network interfaces."""

    instance_role_arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]+$")
    # Empty: Batch uses its service-linked role.
    service_role_arn: str = Field("", pattern=r"^$|^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
    # Mounts FSx for Lustre at /fsx on each host and attaches the instance type's EFA interfaces (see above); empty:
    # every job is refused, naming this field.
    launch_template_id: str = Field("", pattern=r"^$|^lt-[0-9a-f]{8,17}$")
    max_nodes: int = Field(16, ge=1)
    # The training container when no DTP image is published for batch; the programs are then staged on FSx.
    image_uri: str = Field(default_factory=ngc_pytorch_image)
    wait_timeout_minutes: int = Field(WAIT_TIMEOUT_MINUTES, ge=1)

    def creation_problems(self) -> list[str]:
        """Why a compute environment may not be created with these settings, each as ``field: message``: roles the
        worker policy does not let DTP pass (Batch would refuse the compute environment). Not a validator: a
        connection from before the rule still reads, so that what was made with it can be torn down."""
        roles = (
            ("instance_role_arn", self.instance_role_arn, "the instance profile's name", ", and so must its role's"),
            ("service_role_arn", self.service_role_arn, "the role's name", ""),
        )
        return [
            f"{field}: {what} {passed_role_name(arn)!r} {problem}{also}: the worker policy "
            f"(docs/iam/dtp-worker-policy.json) lets DTP pass only {PASSED_ROLE_PREFIX}* roles to Batch and EC2"
            for field, arn, what, also in roles
            if arn and (problem := passed_role_problem(arn))
        ]
