"""MEME: Multi-Architecture Multi-Expert diffusion (Lee et al., AAAI 2024): iformer (the inception mixer), unet
(U-Net and iU-Net), experts (interval experts, soft assignment, routing), presets."""
