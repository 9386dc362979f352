# EKS GPU worker node (managed node group / HyperPod EKS): driver, CUDA (which NCCL and aws-ofi-nccl build
# against), EFA, NCCL, aws-ofi-nccl.
family           = "eks-gpu"
source_ami_name  = "amazon-eks-node-al2023-x86_64-nvidia-1.33-*"
source_ami_owner = "602401143452"
instance_type    = "g5.4xlarge"
ssh_username     = "ec2-user"
