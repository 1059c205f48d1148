"""Bridges to other tools: reading a finished run's checkpoint (run_checkpoint.py), the Hugging
Face export (hf_export.py) and the check that the export loads in a clean interpreter
(pipeline_check.py). Exports hold safetensors only."""
