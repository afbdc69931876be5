"""Analysis that reads checkpoints and run folders: the identity-preservation diagnostic (Fig. 1b/1c), the
augmentation gallery (Fig. 4), the VAE report and time-to-accuracy (Table 11). Sweeps and reproduction
protocols, which train many runs, live one layer up in idaa.experiments."""
