"""The Ray-free core: config, data, models, losses, the adversarial step, the epoch loop, the GPU fast path,
checkpoints, images, run directories and exported model directories. Pure PyTorch: nothing here imports Ray,
so every piece runs and is tested in a plain process."""
