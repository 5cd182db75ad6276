"""What analyze.py works on and writes: snapshots or fresh models with their data, the sensitivity scan's files and
plot, per-layer statistics. The top floor: it may read everything below, and nothing below reads it."""
