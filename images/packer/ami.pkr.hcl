# One template for every DTP AMI family; a family is a var file under families/
# (source AMI, builder instance, SSH user, playbook) plus the component versions.
#
#   packer build -only=amazon-ebs.aws -var-file=versions.pkrvars.hcl -var-file=families/pcluster-gpu.pkrvars.hcl \
#     -var ami_name=... ami.pkr.hcl
#
# Two sources: `aws` boots the source AMI and runs the family's Ansible playbook over SSH;
# `emulator` is the same AMI pipeline against a local EC2 API emulator (no instance to SSH
# into, so no provisioning). The Packer operator picks `emulator` when the AWS connection
# has an endpoint_url. Debian's packer 1.6.6 knows no `packer { required_plugins }` block.
#
# Component versions have no defaults here: versions.pkrvars.hcl holds them (the ami_bake
# DAG's form defaults are read from it), so pass it too: -var-file=versions.pkrvars.hcl

variable "ami_name" {
  type        = string
  description = "Name of the AMI to create; DTP derives it from the family and a fingerprint of the inputs."
}

variable "family" {
  type        = string
  description = "AMI family: the playbook ansible/<family>.yml is run."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "c5.4xlarge"
}

variable "source_ami_name" {
  type        = string
  description = "Name filter of the source AMI (newest match wins)."
}

variable "source_ami_owner" {
  type = string
}

variable "ssh_username" {
  type    = string
  default = "ec2-user"
}

variable "root_volume_gb" {
  type    = number
  default = 100
}

variable "ec2_endpoint" {
  type        = string
  default     = ""
  description = "EC2 API endpoint of the emulator (the emulator source only)."
}

variable "emulator_source_ami_name" {
  type        = string
  default     = "al2023-ami-2023.*-kernel-6.1-x86_64"
  description = "A source AMI the emulator serves (it has no ParallelCluster or EKS images)."
}

variable "emulator_source_ami_owner" {
  type    = string
  default = "137112412989"
}

variable "image_tags" {
  type        = map(string)
  default     = {}
  description = "The run's tags for the AMI and its snapshots, set as packer makes them: one left by a worker that died before the task tagged it still carries its expiry."
}

variable "builder_tags" {
  type        = map(string)
  default     = {}
  description = "Tags of the builder instance and its volumes (the run's, with a short expiry): the reaper finds one packer left behind."
}

variable "ansible_playbook" {
  type        = string
  default     = "ansible-playbook"
  description = "The ansible-playbook command the provisioner runs."
}

variable "nvidia_driver_version" {
  type = string
}

variable "cuda_version" {
  type = string
}

variable "efa_installer_version" {
  type = string
}

variable "nccl_version" {
  type = string
}

variable "aws_ofi_nccl_version" {
  type = string
}

variable "nccl_tests_version" {
  type = string
}

variable "enroot_version" {
  type = string
}

variable "pyxis_version" {
  type = string
}

variable "neuron_version" {
  type = string
}

# Each version is tagged as dtp:<component>: the weekly ami_bake rebakes a family with its published AMI's versions.
locals {
  versions = {
    "dtp:family"        = var.family
    "dtp:nvidia-driver" = var.nvidia_driver_version
    "dtp:cuda"          = var.cuda_version
    "dtp:efa-installer" = var.efa_installer_version
    "dtp:nccl"          = var.nccl_version
    "dtp:aws-ofi-nccl"  = var.aws_ofi_nccl_version
    "dtp:nccl-tests"    = var.nccl_tests_version
    "dtp:enroot"        = var.enroot_version
    "dtp:pyxis"         = var.pyxis_version
    "dtp:neuron"        = var.neuron_version
  }
}

source "amazon-ebs" "aws" {
  region        = var.region
  ami_name      = var.ami_name
  instance_type = var.instance_type
  ssh_username  = var.ssh_username
  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      virtualization-type = "hvm"
      architecture        = "x86_64"
    }
    owners      = [var.source_ami_owner]
    most_recent = true
  }
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.root_volume_gb
    volume_type           = "gp3"
    throughput            = 1000
    iops                  = 10000
    delete_on_termination = true
  }
  tags            = merge(local.versions, var.image_tags)
  snapshot_tags   = merge(local.versions, var.image_tags)
  run_tags        = var.builder_tags
  run_volume_tags = var.builder_tags
}

source "amazon-ebs" "emulator" {
  region                     = var.region
  ami_name                   = var.ami_name
  instance_type              = var.instance_type
  custom_endpoint_ec2        = var.ec2_endpoint
  skip_credential_validation = true
  skip_metadata_api_check    = true
  communicator               = "none"
  source_ami_filter {
    filters = {
      name = var.emulator_source_ami_name
    }
    owners      = [var.emulator_source_ami_owner]
    most_recent = true
  }
  tags            = merge(local.versions, var.image_tags)
  snapshot_tags   = merge(local.versions, var.image_tags)
  run_tags        = var.builder_tags
  run_volume_tags = var.builder_tags
}

build {
  sources = ["source.amazon-ebs.aws", "source.amazon-ebs.emulator"]

  provisioner "ansible" {
    only          = ["amazon-ebs.aws"]
    playbook_file = "${path.root}/ansible/${var.family}.yml"
    user          = var.ssh_username
    command       = var.ansible_playbook
    # Ansible reaches the instance through packer's SSH proxy, whose host key and the user key it makes are RSA
    # keys signed with ssh-rsa (SHA-1), which OpenSSH 8.8 and later refuse unless allowed again. Ansible's own
    # default arguments stay.
    ansible_env_vars = [
      "ANSIBLE_SSH_ARGS=-C -o ControlMaster=auto -o ControlPersist=60s -o HostKeyAlgorithms=+ssh-rsa -o PubkeyAcceptedKeyTypes=+ssh-rsa",
    ]
    extra_arguments = [
      "--extra-vars", "nvidia_driver_version=${var.nvidia_driver_version} cuda_version=${var.cuda_version}",
      "--extra-vars", "efa_installer_version=${var.efa_installer_version} nccl_version=${var.nccl_version}",
      "--extra-vars", "aws_ofi_nccl_version=${var.aws_ofi_nccl_version} nccl_tests_version=${var.nccl_tests_version}",
      "--extra-vars", "enroot_version=${var.enroot_version} pyxis_version=${var.pyxis_version}",
      "--extra-vars", "neuron_version=${var.neuron_version}",
    ]
  }
}
