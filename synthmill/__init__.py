"""synthmill: mass-produce and judge diffusion-model images on a Ray cluster."""

__version__ = "0.1.0"
