"""DistriFusion displaced patch parallelism for diffusers UNets over torch.distributed."""
