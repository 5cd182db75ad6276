"""Deployment: int8 quantization, verified export, and the cost and latency figures of a model as deployed.
Uses the devices of pipeline.train; knows nothing of the job that calls it."""
