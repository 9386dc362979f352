"""Find and delete a run's AWS resources by tag, in dependency order.

Teardown uses it after deleting a stack, for what the stack left behind (a
DELETE_FAILED stack's retained resources, a non-empty bucket, or an emulator
that does not delete everything it created); the reaper uses it for runs
whose teardown never ran. Resources are found by the ``dtp:run`` tag, never
by ids kept in a local file.

NAT gateways are deleted asynchronously on AWS: the sweep waits until they are
gone before it releases their Elastic IPs (InvalidIPAddress.InUse before),
detaches the internet gateway and deletes subnets (DependencyViolation
before). Addresses are found by the tag too (and through the run's NAT
gateways, deleting ones included), so a sweep that stopped after deleting a
NAT gateway releases its address the next time.

It also adds the run's tags to the run's bucket (``tag_bucket``): without dropping the system tags that
CloudFormation puts on a bucket it creates, which S3 refuses to see removed by a PutBucketTagging.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.exceptions import WaiterMaxAttemptsError
from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.amazon.aws.utils.waiter_with_logging import wait
from botocore.exceptions import ClientError

from dtp.naming import TAG_PREFIX, aws_tags, tags_dict

# Tags AWS itself sets (CloudFormation's aws:cloudformation:stack-name, -stack-id, -logical-id): a requester can
# neither set nor remove them, so a bucket carrying them cannot have its whole tag set replaced.
SYSTEM_TAG_PREFIX = "aws:"


class NatGatewaysNotDeleted(RuntimeError):
    """The run's NAT gateways were still deleting when the sweep stopped waiting for them."""


class BucketTaggingFailed(RuntimeError):
    """The Resource Groups Tagging API did not tag the bucket."""


class RunResourceSweeper(AwsBaseHook):
    """EC2 network pieces and S3 buckets of one run, found by its ``dtp:run`` tag."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["client_type"] = "ec2"
        super().__init__(**kwargs)

    @cached_property
    def s3(self) -> S3Hook:
        return S3Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    @cached_property
    def tagging(self) -> Any:
        """A Resource Groups Tagging API client, in the connection's region (the run's bucket's)."""
        return AwsBaseHook(
            aws_conn_id=self.aws_conn_id, region_name=self.region_name, client_type="resourcegroupstaggingapi"
        ).conn

    def bucket_tags(self, bucket: str) -> dict[str, str]:
        """The bucket's tags (none: an empty dict, where S3 answers NoSuchTagSet)."""
        try:
            return tags_dict(self.s3.conn.get_bucket_tagging(Bucket=bucket)["TagSet"])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NoSuchTagSet":
                return {}
            raise

    def tag_bucket(self, bucket: str, tags: dict[str, str]) -> str:
        """Add ``tags`` to the bucket's tags, keeping the ones it has; return how: ``"present"`` (nothing to add),
        ``"tagging-api"`` or ``"put"``.

        PutBucketTagging replaces the whole tag set, and S3 refuses one that drops a system tag (``aws:*``, which
        CloudFormation puts on a bucket it creates: "InvalidTag: System Tags cannot be removed by requester") or
        that names one. A bucket with system tags is therefore tagged through the Resource Groups Tagging API,
        which adds tags; on AWS the stack's tags usually reach the bucket already, and then nothing is written.
        """
        current = self.bucket_tags(bucket)
        missing = {key: value for key, value in tags.items() if current.get(key) != value}
        if not missing:
            return "present"
        if any(key.startswith(SYSTEM_TAG_PREFIX) for key in current):
            arn = f"arn:{self.s3.conn.meta.partition}:s3:::{bucket}"
            failed = self.tagging.tag_resources(ResourceARNList=[arn], Tags=missing).get("FailedResourcesMap")
            if failed:
                raise BucketTaggingFailed(f"could not tag bucket {bucket} with {sorted(missing)}: {failed}")
            return "tagging-api"
        self.s3.conn.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": aws_tags({**current, **tags})})
        return "put"

    def _filter(self, run_key: str) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{TAG_PREFIX}run", "Values": [run_key]}]

    @staticmethod
    def _tagged(resource: dict[str, Any], run_key: str) -> bool:
        return {"Key": f"{TAG_PREFIX}run", "Value": run_key} in resource.get("Tags", [])

    def nat_gateways(self, run_key: str) -> list[dict[str, Any]]:
        """The run's NAT gateways that still exist: deleting ones included (they hold their address until deleted),
        failed ones not (they hold nothing, and AWS deletes them itself).

        The tag is checked here as well: the local emulator ignores tag filters on NAT gateways.
        """
        pages = self.conn.get_paginator("describe_nat_gateways").paginate(Filters=self._filter(run_key))
        return [
            nat
            for page in pages
            for nat in page["NatGateways"]
            if nat["State"] not in ("deleted", "failed") and self._tagged(nat, run_key)
        ]

    @staticmethod
    def _held(nats: list[dict[str, Any]]) -> list[str]:
        """Allocation ids of the NAT gateways' Elastic IPs."""
        return [a["AllocationId"] for n in nats for a in n.get("NatGatewayAddresses", []) if a.get("AllocationId")]

    def addresses(self, run_key: str, nats: list[dict[str, Any]] | None = None) -> list[str]:
        """Allocation ids of the run's Elastic IPs: tagged with the run, or held by one of its NAT gateways."""
        nats = self.nat_gateways(run_key) if nats is None else nats
        tagged = self.conn.describe_addresses(Filters=self._filter(run_key))["Addresses"]
        ids = [a["AllocationId"] for a in tagged if self._tagged(a, run_key)] + self._held(nats)
        return list(dict.fromkeys(ids))

    def tag_addresses(self, run_key: str, tags: dict[str, str]) -> list[str]:
        """Tag the Elastic IPs of the run's NAT gateways with ``tags``; return their allocation ids.

        The template tags the address, and stack tags reach it on AWS, but not on every
        emulator; a sweep finds an address that its NAT gateway no longer holds by this tag.
        """
        ids = self._held(self.nat_gateways(run_key))
        if ids:
            self.conn.create_tags(Resources=ids, Tags=aws_tags(tags))
        return ids

    def find(
        self, run_key: str, buckets: tuple[str, ...] = (), nats: list[dict[str, Any]] | None = None
    ) -> dict[str, list[str]]:
        """Ids of every live resource of the run, by kind (empty lists when none)."""
        ec2, f = self.conn, self._filter(run_key)
        nats = self.nat_gateways(run_key) if nats is None else nats
        found = {
            "nat_gateways": [n["NatGatewayId"] for n in nats],
            "addresses": self.addresses(run_key, nats),
            "internet_gateways": [
                g["InternetGatewayId"] for g in ec2.describe_internet_gateways(Filters=f)["InternetGateways"]
            ],
            "vpc_endpoints": [
                e["VpcEndpointId"]
                for e in ec2.describe_vpc_endpoints(Filters=f)["VpcEndpoints"]
                if e.get("State", "").lower() not in ("deleting", "deleted")
            ],
            "subnets": [s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"]],
            "route_tables": [r["RouteTableId"] for r in ec2.describe_route_tables(Filters=f)["RouteTables"]],
            "security_groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]],
            "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]],
            "buckets": [b for b in buckets if self.s3.check_for_bucket(b)],
        }
        return found

    def empty_bucket(self, name: str) -> int:
        """Delete every object and version; return how many were deleted."""
        if not self.s3.check_for_bucket(name):
            return 0
        deleted = 0
        paginator = self.s3.conn.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=name):
            keys = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if keys:
                self.s3.conn.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted

    def sweep(
        self, run_key: str, buckets: tuple[str, ...] = (), nat_delay: int = 15, nat_attempts: int = 60
    ) -> dict[str, list[str]]:
        """Delete what ``find`` finds, dependents first; return what was deleted.

        NAT gateways are waited for (every ``nat_delay`` s, ``nat_attempts`` times) until
        deleted before anything that depends on them is touched.
        """
        ec2 = self.conn
        nats = self.nat_gateways(run_key)
        found = self.find(run_key, buckets, nats)
        for nat in nats:
            if nat["State"] != "deleting":
                self._ignore_missing(ec2.delete_nat_gateway, NatGatewayId=nat["NatGatewayId"])
        if nats:
            self.wait_nat_gateways_deleted([n["NatGatewayId"] for n in nats], nat_delay, nat_attempts)
        for allocation_id in found["addresses"]:
            self._ignore_missing(ec2.release_address, AllocationId=allocation_id)
        for igw in found["internet_gateways"]:
            try:
                gateway = ec2.describe_internet_gateways(InternetGatewayIds=[igw])["InternetGateways"][0]
            except ClientError as err:
                if "NotFound" in err.response.get("Error", {}).get("Code", ""):
                    continue  # gone since it was found (the stack's own delete may still be running)
                raise
            for attachment in gateway.get("Attachments", []):
                ec2.detach_internet_gateway(InternetGatewayId=igw, VpcId=attachment["VpcId"])
            ec2.delete_internet_gateway(InternetGatewayId=igw)
        if found["vpc_endpoints"]:  # the S3 gateway endpoint: its VPC is not deleted while it is there
            ec2.delete_vpc_endpoints(VpcEndpointIds=found["vpc_endpoints"])
        for table in found["route_tables"]:
            detail = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]
            if any(a.get("Main") for a in detail.get("Associations", [])):
                continue  # the VPC's main table goes with the VPC
            for assoc in detail.get("Associations", []):
                ec2.disassociate_route_table(AssociationId=assoc["RouteTableAssociationId"])
            ec2.delete_route_table(RouteTableId=table)
        for subnet in found["subnets"]:
            ec2.delete_subnet(SubnetId=subnet)
        for group in found["security_groups"]:
            self._revoke_all(group)
        for group in found["security_groups"]:
            self._ignore_missing(ec2.delete_security_group, GroupId=group)
        for vpc in found["vpcs"]:
            ec2.delete_vpc(VpcId=vpc)
        for bucket in found["buckets"]:
            self.empty_bucket(bucket)
            self.s3.delete_bucket(bucket)
        for kind, ids in found.items():
            if ids:
                self.log.info("Swept %s: %s", kind, ", ".join(ids))
        return found

    def wait_nat_gateways_deleted(self, nat_ids: list[str], delay: int = 15, attempts: int = 60) -> None:
        """Wait until the NAT gateways are deleted: their address, subnet and internet route are in use until then."""
        try:
            wait(
                waiter=self.get_waiter("nat_gateway_deleted"),
                waiter_delay=delay,
                waiter_max_attempts=attempts,
                args={"NatGatewayIds": nat_ids},
                failure_message=f"NAT gateways {', '.join(nat_ids)} were not deleted",
                status_message="NAT gateways",
                status_args=["NatGateways[].State"],
            )
        except WaiterMaxAttemptsError as err:
            raise NatGatewaysNotDeleted(
                f"NAT gateways {', '.join(nat_ids)} still not deleted after {delay * attempts}s; their addresses, "
                "subnets and internet gateway are left for the next sweep"
            ) from err

    def _revoke_all(self, group_id: str) -> None:
        """Self-referencing EFA rules keep groups alive: drop every rule first."""
        group = self.conn.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        if group.get("IpPermissions"):
            self.conn.revoke_security_group_ingress(GroupId=group_id, IpPermissions=group["IpPermissions"])
        if group.get("IpPermissionsEgress"):
            self.conn.revoke_security_group_egress(GroupId=group_id, IpPermissions=group["IpPermissionsEgress"])

    @staticmethod
    def _ignore_missing(call: Any, **kwargs: Any) -> None:
        try:
            call(**kwargs)
        except ClientError as err:
            if "NotFound" not in err.response.get("Error", {}).get("Code", ""):
                raise
