"""The core layer: stages, the fold over them, formatting, signatures, and the training state types.

Nothing here imports another layer of jaxpipe except ``errors``.
"""
