"""The input pipeline: synthetic data, tar-shard and HF sources, transforms, tokenizer, loader.

Never imports `trainer`: the trainer passes in the pieces of config this package needs.
See data/README.md for the layout, the public API and how exact resume works.
"""
