"""disco-clip's trainer. The top level is the core of a run, one concern per module:

config (+ config_io), dist (launcher facts, process group), cpu_quirks, model, engine
(DeepSpeed), build (setup), step (one optimizer step), train (the loop), metrics, cli (the
`disco-clip` entry) and demo (the end-to-end `make demo` job). Subpackages:

- checkpoint/ save, verify (manifests, shared storage), resume, elastic resume N -> M ranks.
- losses/  pure math over tensors and a process group; imports only torch.
- eval/    zero-shot, retrieval, periodic eval, the `eval` and `plot` commands.
- plan/    the memory planner (`disco-clip plan`); imports model and engine only to count.
- interop/ reading finished runs and writing other formats (Hugging Face), the isolated
           pipeline check.

The core may import any subpackage; subpackages import the core's config, model and
checkpoint helpers but never train.py or step.py. Nothing here is imported by data/.
"""
