"""``show_tree``: a pytree (parameters, optimizer state) rendered with treescope in a notebook.

The public home of the display helpers the README and ``examples/inspector.ipynb`` use; they live in
``jaxpipe._tools.display``, below the notebook layer, so that ``Pipeline._repr_html_`` can use them too.
"""

from jaxpipe._tools.display import TreeView as TreeView
from jaxpipe._tools.display import show_tree as show_tree

__all__ = ["TreeView", "show_tree"]
