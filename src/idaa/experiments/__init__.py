"""Many runs at once, above training and evaluation: `idaa sweep` (Figs. 5-6) and `idaa reproduce` (protocols of
variants x seeds with compute-matched baselines, and their reports with verdicts)."""
