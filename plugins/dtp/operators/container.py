"""Build a container image and push it: one image per task, found again instead of built twice."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from dtp.hooks.image_builder import ContainerBuildError, ImageBuilder
from dtp.hooks.packer import fingerprint
from dtp.hooks.registry import ContainerRegistryHook


class ContainerImageBuildOperator(BaseOperator):
    """
    Build ``dockerfile`` in ``context_dir`` and push it to the connection's registry.

    The tag is a fingerprint of the Dockerfile, the build context and the build
    args: when the registry already holds that tag (a retry, or a rerun with the
    same inputs) nothing is built and its digest is returned; a changed build
    arg or file gives a new tag and a new image. Returns the pinned reference
    ``registry/repository@sha256:...``.

    :param context_dir: the build context, all of which goes into the tag: the folder the Dockerfile copies from,
        not one above it, whose other files would rebuild the image when they change
    :param dockerfile: the Dockerfile (may lie outside the context)
    :param repository: repository in the registry, e.g. ``dtp/training``
    :param build_args: ``--build-arg`` values (versions)
    :param labels: image labels
    :param registry_conn_id: the registry connection (see ``ContainerRegistryHook``)
    :param tool: ``docker`` or ``buildah``; default: Docker if its daemon answers, else buildah
    """

    template_fields: Sequence[str] = ("context_dir", "dockerfile", "repository", "build_args", "labels")
    ui_color = "#0db7ed"

    def __init__(
        self,
        *,
        context_dir: str,
        dockerfile: str,
        repository: str,
        build_args: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        registry_conn_id: str = ContainerRegistryHook.default_conn_name,
        tool: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.context_dir = context_dir
        self.dockerfile = dockerfile
        self.repository = repository
        self.build_args = build_args or {}
        self.labels = labels or {}
        self.registry_conn_id = registry_conn_id
        self.tool = tool
        self._builder: ImageBuilder | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        registry = ContainerRegistryHook(self.registry_conn_id)
        context_dir, dockerfile = Path(self.context_dir), Path(self.dockerfile)
        tag = fingerprint([dockerfile, context_dir], self.build_args)
        ref = f"{registry.registry}/{self.repository}:{tag}"

        # Before the lookup, so an image found (not built) again also brings its repository's lifecycle policy up to
        # date: the current one keeps the published images.
        registry.ensure_repository(self.repository, self.labels)
        digest = registry.manifest_digest(self.repository, tag)
        built = digest is None
        if digest:
            self.log.info(
                "%s already in the registry as %s (same Dockerfile, context and args): not building", ref, digest
            )
        else:
            builder = self._builder = ImageBuilder(self.tool)
            self.log.info("Building %s with %s", ref, builder.tool)
            builder.build(context_dir, dockerfile, ref, self.build_args, self.labels, self.log.info)
            try:
                with registry.auth_file() as auth:
                    digest = builder.push(ref, auth, registry.tls_verify, self.log.info)
            finally:
                self._remove_local(builder, ref)
        return {
            "image": f"{registry.registry}/{self.repository}@{digest}",
            "tag": ref,
            "digest": digest,
            "built": built,
            "build_args": self.build_args,
        }

    def _remove_local(self, builder: ImageBuilder, ref: str) -> None:
        """Free the worker's disk of the built image, pushed or not (a retry builds again either way); a removal
        that fails is logged, not raised: it changes nothing the task did."""
        try:
            builder.remove(ref)
        except ContainerBuildError as err:
            self.log.warning("Could not remove %s from this worker's %s storage: %s", ref, builder.tool, err)

    def on_kill(self) -> None:
        if self._builder is not None:
            self.log.info("Stopping the %s build and all it started", self._builder.tool)
            self._builder.stop()
