"""safe_delta (Lu et al., "Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on Diverse
Datasets", ICML 2025, arXiv 2505.12038): per linear weight of every decoder layer, the fine-tuning
deltas whose safety cost fits a budget are kept and the rest of the weight stays base's, with an
optimal-brain-surgeon compensation of the deltas taken so that the layer's outputs on safety data
move as little as they can. The cost of an entry is delta^2 / [H^-1]_jj^2, H being the Gram matrix
of the layer's inputs on harmful prompts through base.

`settings.py` is the recipe section (no torch); `run.py` the streamed implementation.
"""
