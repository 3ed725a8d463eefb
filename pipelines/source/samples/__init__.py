"""Generators of small archives in each dataset's exact distributed format (the same file names, member paths,
binary layouts and label files as the real downloads), with learnable images drawn by
`pipelines.source.demo.render_image`, deterministic for a seed, for tests and demos: each returns what it wrote,
so a test checks the readers against the generator rather than against the readers themselves.
"""
