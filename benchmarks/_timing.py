"""The paired-rounds timing the benchmark scripts share; it ships with the demo, which prints the same table.

Scripts here import it as ``_timing`` (run as ``python benchmarks/NAME.py``).
"""

from jaxpipe_demo.timing import format_seconds as format_seconds
from jaxpipe_demo.timing import paired_ratio as paired_ratio
from jaxpipe_demo.timing import paired_rounds as paired_rounds
