"""Ray Train: the per-worker adversarial training loop (`worker`) and the driver that launches it (`driver.fit`)."""
