"""Evaluation: zero-shot classification and retrieval metrics (zeroshot.py, retrieval.py), the
sharded evaluation that training runs periodically (evaluate.py), the `disco-clip eval` command
(command.py) and run plots (plot.py). Imports data/ readers and the model, never the loop."""
