"""Training: the train / evaluate loop, knowledge distillation, devices and precision, and torchrun / DDP.
Reads datasets (pipeline.data); knows nothing of snapshots, pruning or deployment."""
