"""What run.py, analyze.py and the harness drive, in floors that import downward only:

data/      datasets and formats (digits, mnist5k, torchvision, custom JSON and OFRecord)
train/     the training loop, distillation, devices and precision, torchrun / DDP
deploy/    int8, verified export, cost (MACs, params, size) and latency figures
(here)     the job itself: config, job, snapshots and their lineage, results writing,
           plus what every floor shares (errors, atomic writes, CLI helpers)
analysis/  analyze.py's inputs and outputs (sensitivity files, layer statistics)
"""
