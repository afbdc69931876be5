"""Analysis that reads checkpoints and run folders: the identity-preservation diagnostic (Fig. 1b/1c), the
augmentation gallery (Fig. 4), the VAE report, sweeps (Figs. 5-6) and time-to-accuracy (Table 11)."""
