"""The built-in stages: JAX transforms, meshes, ``shard`` and ``data_parallel``."""
