"""Processes the tests start as ``python -m tests.procs.<name>``: a fresh interpreter their subject needs (a frame
drawn by plain diffusers, a load's private memory) that starts warm like the jobs (tests/warm_start.py), where a
script given as ``python -c`` would start cold and import torch and diffusers again (~4 CPU-s each)."""
