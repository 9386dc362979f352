# ParallelCluster GPU compute/head node (p4d/p4de/p5): driver, CUDA, EFA, NCCL, aws-ofi-nccl,
# nccl-tests, enroot + pyxis, Lustre client. Source: the ParallelCluster AL2023 AMI.
family           = "pcluster-gpu"
source_ami_name  = "aws-parallelcluster-3.16.1-amzn2023-hvm-x86_64-*"
source_ami_owner = "247102896272"
instance_type    = "g5.4xlarge"
ssh_username     = "ec2-user"
