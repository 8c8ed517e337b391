"""Generator and discriminator architectures (DCGAN, ProGAN, StyleGAN2), built from configuration by `registry`."""
