"""What the platforms' training containers share: where FSx is mounted, where the training image keeps DTP's
programs, the NGC image it is built FROM, and the environment the trainer's processes need."""

from __future__ import annotations

from typing import Any

from dtp.images.container import build_arg_defaults
from dtp.platforms.base import PlatformNotReady

FSX_MOUNT = "/fsx"
# Where images/containers/training installs DTP's training programs.
IMAGE_TRAINING_DIR = "/opt/dtp/training"


def ngc_pytorch_image(registry_separator: str = "/") -> str:
    """The NGC PyTorch image DTP's training image is built FROM (pyxis names the registry with ``#``)."""
    return f"nvcr.io{registry_separator}nvidia/pytorch:{build_arg_defaults('training')['PYTORCH_TAG']}-py3"


def image_runtime(image: str) -> dict[str, str]:
    """The runtime of DTP's published training image ``image``, which carries the programs."""
    return {"source": f"image {image}", "image": image, "training_dir": IMAGE_TRAINING_DIR}


def is_trainium(instance: dict[str, Any]) -> bool:
    return str(instance["accelerator"]).startswith("trainium")


def is_nvidia(instance: dict[str, Any]) -> bool:
    return instance["accelerator"] != "cpu" and not is_trainium(instance)


def trainer_environment(efa: bool, nvidia: bool) -> dict[str, str]:
    """What the trainer's processes need besides torchrun's settings (as the Slurm job's _env.sh sets)."""
    env = {"OMP_NUM_THREADS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if efa:
        env |= {"FI_PROVIDER": "efa", "FI_EFA_FORK_SAFE": "1"}
    if nvidia:
        env |= {"NCCL_SOCKET_IFNAME": "^lo,docker,veth", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    return env


def require_dtp_trainer(spec: dict[str, Any]) -> None:
    """Refuse a recipe of another framework: off Slurm, DTP launches its own FSDP trainer only."""
    recipe = spec["recipe"]
    if recipe["framework"] != "fsdp":
        raise PlatformNotReady(
            f"recipe {recipe['name']!r} uses {recipe['framework']}; on {spec['params']['platform']} DTP launches its "
            "own FSDP trainer only (the other frameworks' launch templates are Slurm batch scripts)"
        )
