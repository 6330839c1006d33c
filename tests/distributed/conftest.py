# worker.py is the torchrun script the tests launch, not a test module: importing it for
# doctest collection would start nothing and needs FSDP2's imports.
collect_ignore = ["worker.py"]
