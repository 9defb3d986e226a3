"""Evaluation measures: FID and FVD (fid, fvd, i3d), the Inception Score, MEME's Fourier analysis of feature maps, and
the hash-pinned, offline weights of their networks (weights). Import the submodule you use: this file imports none,
so a stage's code dependencies stay the modules it reads."""
