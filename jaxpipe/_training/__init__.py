"""Training: ``init``, evaluation, and ``fit`` as a loop over planned calls with its parts."""
