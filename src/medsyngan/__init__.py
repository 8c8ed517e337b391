"""MedSynGAN: federated, differentially private GANs for synthetic chest X-rays."""

__version__ = "0.1.0"
