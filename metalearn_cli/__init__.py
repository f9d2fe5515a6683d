"""metalearn: config-driven meta-learning (MAML, FO-MAML, Reptile, fine-tuning) on Hydra and Lightning."""

__version__ = "0.1.0"
