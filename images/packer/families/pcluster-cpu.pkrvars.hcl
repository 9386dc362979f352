# ParallelCluster head node / CPU compute: EFA, enroot + pyxis, Lustre client.
family           = "pcluster-cpu"
source_ami_name  = "aws-parallelcluster-3.16.1-amzn2023-hvm-x86_64-*"
source_ami_owner = "247102896272"
instance_type    = "c5.4xlarge"
ssh_username     = "ec2-user"
