"""The training core: config, data, models, the GAN step, checkpoints, the Accelerator."""
