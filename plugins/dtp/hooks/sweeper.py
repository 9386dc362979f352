"""Find and delete a run's AWS resources by tag, in dependency order.

Teardown uses it after deleting a stack, for what the stack left behind (a
DELETE_FAILED stack's retained resources, a non-empty bucket, or an emulator
that does not delete everything it created); the reaper uses it for runs
whose teardown never ran. Resources are found by the ``dtp:run`` tag, never
by ids kept in a local file.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from dtp.naming import TAG_PREFIX


class RunResourceSweeper(AwsBaseHook):
    """EC2 network pieces and S3 buckets of one run, found by its ``dtp:run`` tag."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["client_type"] = "ec2"
        super().__init__(**kwargs)

    @cached_property
    def s3(self) -> Any:
        return S3Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name).conn

    def _filter(self, run_key: str) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{TAG_PREFIX}run", "Values": [run_key]}]

    def find(self, run_key: str, buckets: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Ids of every live resource of the run, by kind (empty lists when none)."""
        ec2, f = self.conn, self._filter(run_key)
        found = {
            "nat_gateways": [
                n["NatGatewayId"]
                for n in ec2.describe_nat_gateways(Filters=f)["NatGateways"]
                if n["State"] not in ("deleted", "deleting")
            ],
            "internet_gateways": [
                g["InternetGatewayId"] for g in ec2.describe_internet_gateways(Filters=f)["InternetGateways"]
            ],
            "subnets": [s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"]],
            "route_tables": [r["RouteTableId"] for r in ec2.describe_route_tables(Filters=f)["RouteTables"]],
            "security_groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]],
            "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]],
            "buckets": [b for b in buckets if self._bucket_exists(b)],
        }
        return found

    def _bucket_exists(self, name: str) -> bool:
        try:
            self.s3.head_bucket(Bucket=name)
        except ClientError:
            return False
        return True

    def empty_bucket(self, name: str) -> int:
        """Delete every object and version; return how many were deleted."""
        if not self._bucket_exists(name):
            return 0
        deleted = 0
        paginator = self.s3.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=name):
            keys = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if keys:
                self.s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted

    def sweep(self, run_key: str, buckets: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Delete what ``find`` finds, dependents first; return what was deleted."""
        ec2 = self.conn
        found = self.find(run_key, buckets)
        for nat in found["nat_gateways"]:
            addresses = ec2.describe_nat_gateways(NatGatewayIds=[nat])["NatGateways"][0].get("NatGatewayAddresses", [])
            ec2.delete_nat_gateway(NatGatewayId=nat)
            for address in addresses:
                if address.get("AllocationId"):
                    self._ignore_missing(ec2.release_address, AllocationId=address["AllocationId"])
        for igw in found["internet_gateways"]:
            for attachment in ec2.describe_internet_gateways(InternetGatewayIds=[igw])["InternetGateways"][0].get(
                "Attachments", []
            ):
                ec2.detach_internet_gateway(InternetGatewayId=igw, VpcId=attachment["VpcId"])
            ec2.delete_internet_gateway(InternetGatewayId=igw)
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
            self.s3.delete_bucket(Bucket=bucket)
        for kind, ids in found.items():
            if ids:
                self.log.info("Swept %s: %s", kind, ", ".join(ids))
        return found

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
