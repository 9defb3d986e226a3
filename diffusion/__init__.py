"""Model-agnostic diffusion engine: config, schedules, objectives, samplers, training and evaluation stages."""
