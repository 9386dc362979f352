"""Running the published training image on Slurm nodes with enroot + pyxis (``srun --container-image``)."""

from __future__ import annotations

from dtp.platforms.containers import IMAGE_TRAINING_DIR


def pyxis_runtime(image: str) -> dict[str, str]:
    """The runtime of ``image`` (``registry/repository@digest``): pyxis names the registry with ``#``, and jobs use
    the interpreter and training programs inside the container (``dtp.pipeline.jobs.container_options``)."""
    registry, _, repository = image.partition("/")
    return {
        "source": f"image {image}",
        "image": f"{registry}#{repository}",
        "container_runtime": "pyxis",
        "python": "python3",
        "training_dir": IMAGE_TRAINING_DIR,
    }
