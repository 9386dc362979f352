"""A container registry: credentials, manifest digests, ECR repositories, unpacking an image.

The registry comes from a connection: ``host`` is the registry (``host[:port]``),
``login``/``password`` its credentials, and the extra may say ``{"ecr": true,
"aws_conn_id": "aws_default"}`` (credentials from the amazon provider's
``EcrHook``, the repository created when missing and given DTP's lifecycle policy)
or ``{"tls_verify": false}`` (a plain-HTTP registry on loopback). Credentials
travel in a mode-600 auth file, never on a command line. An image published for a
platform is tagged ``published-<platform>`` (``tag_image``), which the lifecycle
policy keeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.ecr import EcrHook
from airflow.sdk import BaseHook

from dtp.hooks.image_builder import ContainerBuildError
from dtp.naming import aws_tags

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
# The single-platform manifests DTP's builds push, as ECR's BatchGetImage documents them (it names no index type).
ECR_MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]

# The tag of the image SSM publishes for a platform (``/dtp/images/<platform>/...``): one per platform in each
# repository, moved to the newest image container_build publishes there (``published_tag``).
PUBLISHED_TAG_PREFIX = "published-"
# The lifecycle policy of the ECR repositories DTP pushes to, without which every image built stays (and bills)
# forever. DTP tags an image with the fingerprint of its inputs and pushes only a tag the registry lacks; the only
# tags it moves are the published ones, onto images that keep their fingerprint tags. So the image an SSM parameter
# or a run pins by digest is a tagged one, and an image is left untagged only by a push over one of its tags, which
# DTP does not make.
UNTAGGED_IMAGE_DAYS = 14  # two weeks to notice such a push, and tag the image it replaced again if it is wanted
# A run pins the image SSM named when it started, and a backfill one SSM named at its date. ECR counts by push
# time, and an image a build finds instead of building it again keeps its first push's: so many are kept that such
# an image expires only after this many builds with other inputs into its repository.
IMAGES_KEPT = 30
# More than the platforms that can publish into one repository: each published image is kept.
PUBLISHED_IMAGES_KEPT = 100
# The start of the description of each rule DTP sets: a policy whose rules all have it is DTP's, to be replaced by
# the current one; any other is the account owner's, and left as it is.
DTP_RULE = "dtp: "
LIFECYCLE_POLICY: dict[str, Any] = {
    "rules": [
        {
            # ECR's rules have no "keep" action: an image a rule selects is never expired by a rule of a lower
            # priority (a higher number), and this one selects each published image and expires none of them.
            "rulePriority": 1,
            "description": f"{DTP_RULE}keep the images published for each platform ({PUBLISHED_TAG_PREFIX}<platform>)",
            "selection": {
                "tagStatus": "tagged",
                "tagPrefixList": [PUBLISHED_TAG_PREFIX],
                "countType": "imageCountMoreThan",
                "countNumber": PUBLISHED_IMAGES_KEPT,
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 2,
            "description": f"{DTP_RULE}expire untagged images {UNTAGGED_IMAGE_DAYS} days after their push",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": UNTAGGED_IMAGE_DAYS,
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 3,
            "description": f"{DTP_RULE}keep the newest {IMAGES_KEPT} images",
            "selection": {
                # DTP's tags are fingerprints, which no prefix tells apart: "any" (evaluated last) takes them all.
                "tagStatus": "any",
                "countType": "imageCountMoreThan",
                "countNumber": IMAGES_KEPT,
            },
            "action": {"type": "expire"},
        },
    ]
}


class ContainerRegistryHook(BaseHook):
    """
    A container registry: credentials, manifest lookups, ECR repositories.

    :param registry_conn_id: connection whose host is the registry
    """

    conn_name_attr = "registry_conn_id"
    default_conn_name = "container_registry"
    conn_type = "generic"
    hook_name = "Container registry"

    def __init__(self, registry_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.registry_conn_id = registry_conn_id

    @cached_property
    def connection(self) -> Any:
        return self.get_connection(self.registry_conn_id)

    @property
    def extra(self) -> dict[str, Any]:
        return self.connection.extra_dejson

    @property
    def registry(self) -> str:
        host = self.connection.host
        return f"{host}:{self.connection.port}" if self.connection.port else host

    @property
    def tls_verify(self) -> bool:
        return bool(self.extra.get("tls_verify", True))

    @property
    def is_ecr(self) -> bool:
        return bool(self.extra.get("ecr"))

    @cached_property
    def ecr(self) -> EcrHook:
        return EcrHook(aws_conn_id=self.extra.get("aws_conn_id", "aws_default"))

    def credentials(self) -> tuple[str, str] | None:
        """(user, password) for the registry, or None for an anonymous one."""
        if self.is_ecr:
            token = self.ecr.get_temporary_credentials()[0]
            return token.username, token.password
        if self.connection.login:
            return self.connection.login, self.connection.password or ""
        return None

    @contextmanager
    def auth_file(self) -> Iterator[Path]:
        """A docker-config style auth file (mode 600) for buildah/docker, deleted afterwards."""
        with tempfile.TemporaryDirectory(prefix="dtp-registry-auth-") as folder:
            path = Path(folder) / "config.json"
            creds = self.credentials()
            auths = (
                {self.registry: {"auth": base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()}} if creds else {}
            )
            path.touch(mode=0o600)
            path.write_text(json.dumps({"auths": auths}))
            yield path

    def ensure_repository(self, repository: str, tags: Mapping[str, str]) -> None:
        """On ECR, create the repository (scan on push, tagged) unless it exists, and give it ``LIFECYCLE_POLICY``
        unless it has a lifecycle policy of its owner's (one DTP did not set)."""
        if not self.is_ecr:
            return
        client = self.ecr.conn
        try:
            client.describe_repositories(repositoryNames=[repository])
        except client.exceptions.RepositoryNotFoundException:
            client.create_repository(
                repositoryName=repository,
                imageScanningConfiguration={"scanOnPush": True},
                tags=aws_tags(tags),
            )
        try:
            current = json.loads(client.get_lifecycle_policy(repositoryName=repository)["lifecyclePolicyText"])
        except client.exceptions.LifecyclePolicyNotFoundException:
            current = None
        if current is None or (_set_by_dtp(current) and current != LIFECYCLE_POLICY):
            client.put_lifecycle_policy(repositoryName=repository, lifecyclePolicyText=json.dumps(LIFECYCLE_POLICY))

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The registry's digest of ``repository:reference`` (``Docker-Content-Digest``), None if absent."""
        try:
            headers, _ = self._manifest_call("HEAD", repository, reference, {"Accept": MANIFEST_TYPES})
        except urllib.error.HTTPError as err:
            _raise_unless_absent(err)
            return None
        return headers.get("Docker-Content-Digest")

    def tag_image(self, repository: str, digest: str, tag: str) -> None:
        """Point ``repository:tag`` at the image ``digest``, moving the tag off the image it named: the image's own
        manifest put again under the tag (ECR's PutImage, else the registry's manifest API), so nothing is pushed
        again and the digest stays. Tagging an image with the tag it has already does nothing."""
        if not self.is_ecr:
            headers, manifest = self._manifest_call("GET", repository, digest, {"Accept": MANIFEST_TYPES})
            content_type = {"Content-Type": headers["Content-Type"]}
            self._manifest_call("PUT", repository, tag, content_type, manifest, actions="pull,push")
            return
        client = self.ecr.conn
        found = client.batch_get_image(
            repositoryName=repository, imageIds=[{"imageDigest": digest}], acceptedMediaTypes=ECR_MANIFEST_TYPES
        )
        if not found["images"]:
            raise ContainerBuildError(f"cannot tag {repository}@{digest} {tag}: {found['failures']}")
        image = found["images"][0]
        # ECR refuses to put a tag on the image it names already: a retry, or a rerun publishing the same image.
        with contextlib.suppress(client.exceptions.ImageAlreadyExistsException):
            client.put_image(
                repositoryName=repository,
                imageManifest=image["imageManifest"],
                imageManifestMediaType=image["imageManifestMediaType"],
                imageTag=tag,
                imageDigest=digest,
            )

    def _manifest_call(
        self,
        method: str,
        repository: str,
        reference: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        actions: str = "pull",
    ) -> tuple[Any, bytes]:
        """``method`` on the manifest ``repository:reference`` (the registry API's ``/v2/.../manifests/...``): the
        answer's headers and body; raises ``urllib.error.HTTPError``. A registry that answers with a token challenge
        (Docker Hub, GHCR, Quay, Harbor) is asked for a token for ``actions`` first."""
        scheme = "https" if self.tls_verify else "http"
        url = f"{scheme}://{self.registry}/v2/{repository}/manifests/{reference}"
        creds = self.credentials()
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        try:
            return _send(method, url, headers, body, basic)
        except urllib.error.HTTPError as err:
            challenge = err.headers.get("WWW-Authenticate", "") if err.code == 401 else ""
            if not challenge.lower().startswith("bearer "):
                raise
        bearer = "Bearer " + bearer_token(challenge, repository, basic, actions)
        return _send(method, url, headers, body, bearer)

    def has_image(self, image: str) -> bool:
        """Whether the registry still has ``image``, a ``registry/repository@digest`` (or ``:tag``) reference to an
        image in it: ECR's DescribeImages on ECR, else a manifest lookup (``manifest_digest``)."""
        repository, reference = split_reference(image.removeprefix(f"{self.registry}/"))
        if not self.is_ecr:
            return self.manifest_digest(repository, reference) is not None
        client = self.ecr.conn
        image_id = {"imageDigest": reference} if reference.startswith("sha256:") else {"imageTag": reference}
        try:
            return bool(client.describe_images(repositoryName=repository, imageIds=[image_id])["imageDetails"])
        except (client.exceptions.ImageNotFoundException, client.exceptions.RepositoryNotFoundException):
            return False

    def unpack(self, image: str, dest: Path) -> Path:
        """Unpack ``image`` (a ``registry/repo@digest`` reference) into ``dest`` as a root filesystem.

        What ``enroot import`` does for pyxis, for hosts without enroot: skopeo copies
        the image into a directory, its layers are extracted in order (tar's ``data``
        filter refuses absolute paths, links out of the tree and device files), and
        the tree is renamed into place, so a half-written one is never seen. An image
        already unpacked at ``dest`` is kept. Whiteout files are not applied: meant for
        images that add files layer on layer, as DTP's do, not for general images.
        """
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as work, self.auth_file() as auth:
            layout = Path(work) / "image"
            copied = subprocess.run(
                [
                    "skopeo",
                    "copy",
                    f"--authfile={auth}",
                    f"--src-tls-verify={str(self.tls_verify).lower()}",
                    f"docker://{image}",
                    f"dir:{layout}",
                ],
                check=False,
                capture_output=True,
                text=True,
            )
            if copied.returncode != 0:
                raise ContainerBuildError(f"cannot fetch {image}: {copied.stderr.strip()}")
            rootfs = Path(work) / "rootfs"
            rootfs.mkdir()
            manifest = json.loads((layout / "manifest.json").read_text())
            for layer in manifest["layers"]:
                with tarfile.open(layout / layer["digest"].split(":", 1)[1]) as archive:
                    archive.extractall(rootfs, filter="data")
            try:
                rootfs.rename(dest)
            except OSError:
                if not dest.is_dir():  # another run unpacked the same image meanwhile
                    raise
        return dest


def published_tag(platform: str) -> str:
    """The tag of the image published for ``platform``, which DTP's lifecycle policy keeps."""
    return f"{PUBLISHED_TAG_PREFIX}{platform}"


def split_reference(name: str) -> tuple[str, str]:
    """``repository@digest`` or ``repository:tag`` -> (repository, digest or tag)."""
    repository, at, digest = name.partition("@")
    if at:
        return repository, digest
    repository, _, tag = name.rpartition(":")
    return repository, tag


def _set_by_dtp(policy: Mapping[str, Any]) -> bool:
    """Whether DTP set the lifecycle ``policy``: each of its rules is described as one of DTP's."""
    rules = policy.get("rules") or []
    return bool(rules) and all(str(rule.get("description", "")).startswith(DTP_RULE) for rule in rules)


def _raise_unless_absent(err: urllib.error.HTTPError) -> None:
    """Raise a registry's refusal, unless it only says it has no such manifest (404)."""
    if err.code != 404:
        raise err


def _send(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None, authorization: str | None
) -> tuple[Any, bytes]:
    """One HTTP(S) request to the registry: the answer's headers and body."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))  # noqa: S310
    if authorization:
        request.add_header("Authorization", authorization)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http(s) only
        return response.headers, response.read()


def bearer_token(challenge: str, repository: str, basic: str | None, actions: str = "pull") -> str:
    """A token for ``actions`` on ``repository`` (the scope the challenge names, if it names one) from the token
    service a ``WWW-Authenticate: Bearer realm=...`` challenge names (the registry token flow), asked with the
    connection's credentials when it has some."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not fields.get("realm", "").startswith(("https://", "http://")):
        raise ValueError(f"the registry's token challenge names no http(s) realm: {challenge!r}")
    scope = fields.get("scope") or f"repository:{repository}:{actions}"
    query = {"service": fields.get("service", ""), "scope": scope}
    request = urllib.request.Request(f"{fields['realm']}?{urllib.parse.urlencode(query)}")  # noqa: S310
    if basic:
        request.add_header("Authorization", basic)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the realm is http(s), checked above
        answer = json.load(response)
    return answer.get("token") or answer["access_token"]
