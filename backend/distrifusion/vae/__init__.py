"""The VAE stage at high resolution: what a decode costs (:mod:`.footprint`), tiles and their blend
(:mod:`.tiles`), GroupNorm statistics shared across tiles (:mod:`.shared_norms`), the tile graphs
(:mod:`.export`) and the stage's decode, whole or tiled (:mod:`.decode`)."""
