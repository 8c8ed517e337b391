"""Training: losses, the one GAN step (`step.GANTrainer`), checkpoints and generation."""
