"""isearle: zero-shot composed image retrieval by textual inversion (SEARLE / iSEARLE).

Modules, one idea each: backbone (loading CLIP), pseudo_word (encoding prompts with S*), oti
(optimisation-based inversion), phi / phi_training (the inversion network), concepts, phrases,
index (FAISS gallery), retrieval (composed queries), evaluation (CIRR, CIRCO, FashionIQ, shapes),
shapes (the offline world), cli.
"""

__version__ = "0.1.0"
