"""Running the published training image on Slurm nodes with enroot + pyxis (``srun --container-image``).

pyxis hands ``--container-image`` to ``enroot import`` as ``docker://<image>``. enroot before 4.0 (the AMIs pin
3.5.0, HyperPod's reference base-config installs 3.4.1) takes ``docker://[USER@][REGISTRY#]IMAGE[:TAG]`` only: no
``@digest``. It asks the registry for ``/v2/<IMAGE>/manifests/<TAG>``, and the registry API takes a digest there as
it takes a tag, so ``REGISTRY#IMAGE:sha256:...`` imports the image the digest pins with those releases and with
4.x, which turns its own digest forms into the same request.
"""

from __future__ import annotations

import re

from dtp.platforms.containers import IMAGE_TRAINING_DIR

# A published image's reference, as container_build writes it to SSM.
PINNED_IMAGE = re.compile(r"(?P<registry>[^/]+)/(?P<repository>[^:@]+)@(?P<digest>sha256:[0-9a-f]+)")
# An ECR registry's host, which names its region (FIPS and China endpoints included).
ECR_REGISTRY = re.compile(r"\d{12}\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")


def enroot_image(image: str) -> str:
    """enroot's reference to ``image`` (``registry/repository@sha256:...``): ``registry#repository:sha256:...``,
    the digest in the tag's place, which enroot 3.x and 4.x both take (the module's docstring)."""
    pinned = PINNED_IMAGE.fullmatch(image)
    if not pinned:
        raise ValueError(f"{image!r} is not an image pinned by digest (registry/repository@sha256:...)")
    return f"{pinned['registry']}#{pinned['repository']}:{pinned['digest']}"


def enroot_credentials(image: str) -> str | None:
    """The line of enroot's ``$ENROOT_CONFIG_PATH/.credentials`` (netrc) that logs its import of ``image`` in to
    ECR, None for another registry. enroot evaluates a password that starts with ``$`` when it imports, so each
    node gets a fresh token from its own instance role (enroot's doc/cmd/import.md)."""
    registry = image.partition("/")[0]
    ecr = ECR_REGISTRY.fullmatch(registry)
    if not ecr:
        return None
    return f"machine {registry} login AWS password $(aws ecr get-login-password --region {ecr['region']})"


def pyxis_runtime(image: str) -> dict[str, str]:
    """The runtime of ``image`` (``registry/repository@digest``): pyxis takes it as enroot names it
    (``enroot_image``), with the ECR login its import needs (``enroot_credentials``, which the Slurm job's preamble
    writes), and jobs use the interpreter and training programs inside the container
    (``dtp.pipeline.jobs.container_options``)."""
    credentials = enroot_credentials(image)
    return {
        "source": f"image {image}",
        "image": enroot_image(image),
        "container_runtime": "pyxis",
        "python": "python3",
        "training_dir": IMAGE_TRAINING_DIR,
        **({"enroot_credentials": credentials} if credentials else {}),
    }
