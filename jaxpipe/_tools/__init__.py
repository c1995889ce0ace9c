"""Tools over a pipeline: error advice, inspection, compile events, spec text, summaries, HTML views."""
