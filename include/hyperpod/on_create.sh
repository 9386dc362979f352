#!/bin/bash
# HyperPod lifecycle entry point (OnCreate), uploaded by dtp.platforms.hyperpod with the run's
# provisioning_parameters.json. Slurm, FSx and user setup is the reference base-config's
# lifecycle_script.py (aws-samples/awsome-distributed-training, 1.architectures/5.sagemaker-hyperpod/
# LifecycleScripts/base-config), copied next to this file from the dtp_hyperpod connection's base_config_uri.
set -euo pipefail

LOG_DIR=/var/log/provision
mkdir -p "$LOG_DIR"
exec > >(tee -a "$LOG_DIR/provisioning.log") 2>&1

RESOURCE_CONFIG="${SAGEMAKER_RESOURCE_CONFIG_PATH:-/opt/ml/config/resource_config.json}"
if [[ ! -f "$RESOURCE_CONFIG" ]]; then
  echo "dtp on_create: no resource config at $RESOURCE_CONFIG; this is not a HyperPod node" >&2
  exit 1
fi
if [[ ! -f lifecycle_script.py ]]; then
  echo "dtp on_create: lifecycle_script.py is missing: set base_config_uri in the dtp_hyperpod connection" \
       "to an S3 prefix holding the reference base-config scripts" >&2
  exit 1
fi
echo "dtp on_create: running lifecycle_script.py with $RESOURCE_CONFIG and provisioning_parameters.json"
python3 -u lifecycle_script.py -rc "$RESOURCE_CONFIG" -pp provisioning_parameters.json
