"""MEME: Multi-Architecture Multi-Expert diffusion (Lee et al.; AAAI 2024). Lands with the MEME issue."""
