"""Training: losses, the one GAN step (`step.GANTrainer`), checkpoints, centralized runs and generation."""
