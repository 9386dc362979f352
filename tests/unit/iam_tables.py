"""What the IAM policy check (test_iam_policy.py) reads beside the code: the sources each policy covers, and the
tables of what a static scan cannot see (actions named otherwise than their operation, provider hook methods and
operators, dynamic calls, tag-on-create actions, passed roles, and the actions CloudFormation takes per resource
type)."""

from __future__ import annotations

from pathlib import Path

from dtp.naming import TAG_PREFIX

ROOT = Path(__file__).resolve().parents[2]
IAM_DIR = ROOT / "docs" / "iam"
PLUGINS = ROOT / "plugins" / "dtp"
WORKER_SOURCES = sorted(
    [
        *(ROOT / "dags").glob("*.py"),
        *(p for p in PLUGINS.rglob("*.py") if p.relative_to(PLUGINS).parts[0] not in {"local", "deploy"}),
    ]
)
DEPLOY_SOURCES = [PLUGINS / "deploy" / "mwaa.py"]
TEMPLATES = sorted((ROOT / "include" / "templates" / "cloudformation").glob("*.yaml"))
PCLUSTER_CONFIG = ROOT / "include" / "templates" / "parallelcluster" / "cluster-config.yaml.j2"
OWNER_TAG = f"{TAG_PREFIX}owner"
# IAM's limit on a managed policy, whitespace not counted.
MANAGED_POLICY_CHARS = 6144

# IAM actions that are not named "<signing name>:<operation>" (the Service Authorization Reference's tables).
ACTION_EXCEPTIONS: dict[str, tuple[str, ...]] = {
    "s3:HeadBucket": ("s3:ListBucket",),
    "s3:HeadObject": ("s3:GetObject",),
    "s3:ListObjectsV2": ("s3:ListBucket",),
    "s3:ListObjectVersions": ("s3:ListBucketVersions",),
    "s3:ListBuckets": ("s3:ListAllMyBuckets",),
    "s3:DeleteObjects": ("s3:DeleteObject", "s3:DeleteObjectVersion"),  # per key, by version when one is given
    "s3:CopyObject": ("s3:GetObject", "s3:PutObject"),
    "s3:GetBucketLifecycleConfiguration": ("s3:GetLifecycleConfiguration",),
    "s3:PutBucketLifecycleConfiguration": ("s3:PutLifecycleConfiguration",),
    # The Resource Groups Tagging API signs as "tagging", is authorized as "tag", and tags a bucket through S3.
    "tagging:TagResources": ("tag:TagResources", "s3:GetBucketTagging", "s3:PutBucketTagging"),
}
# Methods of the amazon provider's hooks that DTP calls, and what they call (the scan sees the hook, not its client).
PROVIDER_METHODS: dict[str, tuple[str, ...]] = {
    "S3Hook.check_for_bucket": ("s3:ListBucket",),  # HeadBucket
    "S3Hook.create_bucket": ("s3:CreateBucket",),
    "S3Hook.delete_bucket": ("s3:DeleteBucket",),
    "S3Hook.put_bucket_tagging": ("s3:PutBucketTagging",),
    "S3Hook.check_for_key": ("s3:GetObject",),  # HeadObject
    "S3Hook.head_object": ("s3:GetObject",),
    "S3Hook.read_key": ("s3:GetObject",),
    "S3Hook.list_keys": ("s3:ListBucket",),
    "S3Hook.iter_file_metadata": ("s3:ListBucket",),
    "S3Hook.load_file": ("s3:PutObject",),
    "S3Hook.load_string": ("s3:PutObject",),
    "S3Hook.copy_object": ("s3:GetObject", "s3:PutObject"),
    "S3Hook.delete_objects": ("s3:DeleteObject",),
    "S3Hook.generate_presigned_url": ("s3:GetObject",),  # the URL reads with its signer's permissions
    "S3Hook.parse_s3_url": (),
    "SsmHook.get_parameter_value": ("ssm:GetParameter",),
    "EksHook.generate_config_file_with_credentials": ("eks:DescribeCluster",),
    # The token buildah and the local platform push and pull images with, through ECR's registry API.
    "EcrHook.get_temporary_credentials": (
        "ecr:GetAuthorizationToken",
        "ecr:BatchCheckLayerAvailability",
        "ecr:InitiateLayerUpload",
        "ecr:UploadLayerPart",
        "ecr:CompleteLayerUpload",
        "ecr:PutImage",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
    ),
}
# The amazon provider's operators, sensors and triggers DTP uses (subclassed or deferred to), and what they call.
PROVIDER_CLASSES: dict[str, tuple[str, ...]] = {
    "BatchOperator": ("batch:SubmitJob", "batch:DescribeJobs", "batch:TerminateJob"),  # on_kill terminates
    "BatchJobTrigger": ("batch:DescribeJobs",),
    "CloudFormationCreateStackSensor": ("cloudformation:DescribeStacks",),
}
# boto3's own methods of an S3 client (s3transfer): no operation of the service model.
BOTO3_METHODS: dict[str, tuple[str, ...]] = {
    "s3.download_file": ("s3:GetObject",),
    "s3.upload_file": ("s3:PutObject",),
}
# getattr(client, <expression>): the operations each expression (as ast.unparse writes it) names.
DYNAMIC_CALLS: dict[str, tuple[str, ...]] = {
    "f'describe_{kind}s'": ("describe_compute_environments", "describe_job_queues"),  # dtp.platforms.batch
    "f'update_{kind}'": ("update_compute_environment", "update_job_queue"),
    "f'delete_{kind}'": ("delete_compute_environment", "delete_job_queue"),
    "operation": ("describe_data_repository_associations", "describe_data_repository_tasks"),  # FsxHook._described
}
# Operations DTP calls with tags: AWS authorizes the tags with the service's tagging action too.
TAG_ON_CREATE: dict[str, str] = {
    "sagemaker:CreateCluster": "sagemaker:AddTags",
    "batch:CreateComputeEnvironment": "batch:TagResource",
    "batch:CreateJobQueue": "batch:TagResource",
    "batch:RegisterJobDefinition": "batch:TagResource",
    "ecr:CreateRepository": "ecr:TagResource",
    "fsx:CreateDataRepositoryTask": "fsx:TagResource",
    "cloudformation:CreateStack": "cloudformation:TagResource",
    "airflow:CreateEnvironment": "airflow:TagResource",
}
# Operations whose request names an IAM role, and the services it is passed to (iam:PassedToService).
PASSED_ROLES: dict[str, tuple[str, ...]] = {
    "sagemaker:CreateCluster": ("sagemaker.amazonaws.com",),  # the instance groups' execution role
    "batch:CreateComputeEnvironment": ("batch.amazonaws.com", "ec2.amazonaws.com"),  # service and instance role
    "airflow:CreateEnvironment": ("airflow.amazonaws.com",),
    "airflow:UpdateEnvironment": ("airflow.amazonaws.com",),
}
# What CloudFormation calls, with the caller's permissions, to create and to delete each resource type the templates
# declare (for the properties they set; tags are the stack's, which CloudFormation puts on every resource).
RESOURCE_ACTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "AWS::EC2::VPC": (
        ("ec2:CreateVpc", "ec2:ModifyVpcAttribute", "ec2:CreateTags", "ec2:DescribeVpcs", "ec2:DescribeVpcAttribute"),
        ("ec2:DeleteVpc", "ec2:DescribeVpcs"),
    ),
    "AWS::EC2::InternetGateway": (
        ("ec2:CreateInternetGateway", "ec2:CreateTags", "ec2:DescribeInternetGateways"),
        ("ec2:DeleteInternetGateway", "ec2:DescribeInternetGateways"),
    ),
    "AWS::EC2::VPCGatewayAttachment": (
        ("ec2:AttachInternetGateway", "ec2:DescribeInternetGateways"),
        ("ec2:DetachInternetGateway", "ec2:DescribeInternetGateways"),
    ),
    "AWS::EC2::EIP": (
        ("ec2:AllocateAddress", "ec2:CreateTags", "ec2:DescribeAddresses"),
        ("ec2:ReleaseAddress", "ec2:DisassociateAddress", "ec2:DescribeAddresses"),
    ),
    "AWS::EC2::NatGateway": (
        ("ec2:CreateNatGateway", "ec2:CreateTags", "ec2:DescribeNatGateways"),
        ("ec2:DeleteNatGateway", "ec2:DescribeNatGateways"),
    ),
    "AWS::EC2::SecurityGroup": (
        (
            "ec2:CreateSecurityGroup",
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:AuthorizeSecurityGroupEgress",
            "ec2:RevokeSecurityGroupEgress",
            "ec2:CreateTags",
            "ec2:DescribeSecurityGroups",
        ),
        ("ec2:DeleteSecurityGroup", "ec2:DescribeSecurityGroups", "ec2:DescribeInstances"),
    ),
    "AWS::EC2::SecurityGroupIngress": (
        ("ec2:AuthorizeSecurityGroupIngress", "ec2:DescribeSecurityGroupRules"),
        ("ec2:RevokeSecurityGroupIngress", "ec2:DescribeSecurityGroupRules"),
    ),
    "AWS::EC2::SecurityGroupEgress": (
        ("ec2:AuthorizeSecurityGroupEgress", "ec2:DescribeSecurityGroupRules"),
        ("ec2:RevokeSecurityGroupEgress", "ec2:DescribeSecurityGroupRules"),
    ),
    "AWS::EC2::Subnet": (
        ("ec2:CreateSubnet", "ec2:ModifySubnetAttribute", "ec2:CreateTags", "ec2:DescribeSubnets"),
        ("ec2:DeleteSubnet", "ec2:DescribeSubnets"),
    ),
    "AWS::EC2::RouteTable": (
        ("ec2:CreateRouteTable", "ec2:CreateTags", "ec2:DescribeRouteTables"),
        ("ec2:DeleteRouteTable", "ec2:DescribeRouteTables"),
    ),
    "AWS::EC2::Route": (
        ("ec2:CreateRoute", "ec2:DescribeRouteTables", "ec2:DescribeNetworkInterfaces"),
        ("ec2:DeleteRoute", "ec2:DescribeRouteTables"),
    ),
    "AWS::EC2::SubnetRouteTableAssociation": (
        ("ec2:AssociateRouteTable", "ec2:DescribeSubnets", "ec2:DescribeRouteTables"),
        ("ec2:DisassociateRouteTable", "ec2:DescribeSubnets", "ec2:DescribeRouteTables"),
    ),
    "AWS::EC2::VPCEndpoint": (
        ("ec2:CreateVpcEndpoint", "ec2:CreateTags", "ec2:DescribeVpcEndpoints"),
        ("ec2:DeleteVpcEndpoints", "ec2:DescribeVpcEndpoints"),
    ),
    "AWS::EC2::PlacementGroup": (
        ("ec2:CreatePlacementGroup", "ec2:CreateTags", "ec2:DescribePlacementGroups"),
        ("ec2:DeletePlacementGroup", "ec2:DescribePlacementGroups"),
    ),
    "AWS::S3::Bucket": (
        ("s3:CreateBucket", "s3:PutBucketPublicAccessBlock", "s3:PutBucketTagging", "s3:ListBucket"),
        ("s3:DeleteBucket", "s3:ListBucket"),
    ),
}
# Attributes of a boto3 client that are no operation and call none.
CLIENT_PLUMBING = frozenset({"get_paginator", "get_waiter", "can_paginate", "exceptions", "meta", "close"})
# The provider's hooks hand out clients or sessions this scan does not follow: using one fails the scan.
UNFOLLOWED = frozenset({"async_conn", "get_async_conn", "get_session", "get_resource_type"})
