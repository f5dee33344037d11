"""precise-rl: RL post-training of flow-matching image generators with SDE-consistent samplers."""

__version__ = "0.1.0"
