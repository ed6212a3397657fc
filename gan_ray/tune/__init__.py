"""Ray Tune: hyperparameter sweeps whose trials are Ray Train runs, scored by fd, stopped early by ASHA or evolved
by PBT; the best checkpoint is exported as a model directory. `space` is Ray-free."""
