"""Builders for tests and benchmarks, not used by a job: tiny seeded pipelines saved in the real diffusers
format (``tiny``), random metric weights in the real files' layout (``random_weights``), and full-size
random-weight pipelines of the published architectures (``full_size``, ``unet_configs``).

Each writes real files that synthmill then loads through the same code a user's model or weights go through.
"""
