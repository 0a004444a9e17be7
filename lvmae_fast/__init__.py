"""lvmae_fast: packed-sequence LV-MAE."""
