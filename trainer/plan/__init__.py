"""The memory planner: per-GPU bytes of a run before it is launched (planner.py, the `disco-clip
plan` command) from a per-layer activation model (activations.py). Builds presets on the meta
device to count parameters; allocates nothing."""
