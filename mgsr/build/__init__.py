"""The stages of a training run, one job per module; `mgsr.pipeline.run` puts them in order.

tokenizer -> data -> teacher -> student -> module -> trainer (fit) -> evaluate
"""
