# ParallelCluster Trainium (trn1/trn1n/trn2): Neuron driver + runtime + tools, EFA, enroot + pyxis, Lustre client.
family           = "pcluster-neuron"
source_ami_name  = "aws-parallelcluster-3.16.1-amzn2023-hvm-x86_64-*"
source_ami_owner = "247102896272"
instance_type    = "trn1.2xlarge"
ssh_username     = "ec2-user"
