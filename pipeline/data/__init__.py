"""Datasets and their formats: the builtin sets (digits, mnist5k, torchvision's), custom JSON datasets and their
OFRecord copies, all read into one in-memory ImageDataset. Imports nothing else of the pipeline but its errors and
atomic writes."""
