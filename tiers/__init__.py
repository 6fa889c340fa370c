"""Storage tiers of kvgate: HBM and DRAM arenas, an LMDB disk tier, and the hierarchy."""
