"""jaxpipe: JAX transforms as a declarative, inspectable pipeline.

>>> from jaxpipe import Pipeline
>>> Pipeline(abs).grad().jit().explain()
'jax.jit(jax.grad(abs))'
"""

from jaxpipe._cache import CompileEvents as CompileEvents
from jaxpipe._cache import disable_compilation_cache as disable_compilation_cache
from jaxpipe._cache import enable_compilation_cache as enable_compilation_cache
from jaxpipe._fit import FitRun as FitRun
from jaxpipe._fit import evaluate as evaluate
from jaxpipe._fit import fit as fit
from jaxpipe._history import History as History
from jaxpipe._inspect import Cost as Cost
from jaxpipe._inspect import Memory as Memory
from jaxpipe._inspect import Timing as Timing
from jaxpipe._pipeline import Pipeline as Pipeline
from jaxpipe._prng import KeyReuseWarning as KeyReuseWarning
from jaxpipe._prng import KeyTree as KeyTree
from jaxpipe._prng import key_tree as key_tree
from jaxpipe._spec import SpecError as SpecError
from jaxpipe._stages import Stage as Stage
from jaxpipe._stages import StageContext as StageContext
from jaxpipe._stages import StageKind as StageKind
from jaxpipe._stages import Training as Training
from jaxpipe._summary import ParamSummary as ParamSummary
from jaxpipe._summary import param_summary as param_summary
from jaxpipe._tensorboard import TensorBoard as TensorBoard
from jaxpipe._train import TrainLoss as TrainLoss
from jaxpipe._train import TrainState as TrainState
from jaxpipe._train import loss_and_metrics as loss_and_metrics
from jaxpipe._train import split_init_key as split_init_key
from jaxpipe.errors import PipelineError as PipelineError
from jaxpipe.errors import PluginError as PluginError
from jaxpipe.errors import PluginWarning as PluginWarning
from jaxpipe.errors import UnknownStageError as UnknownStageError
from jaxpipe.hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """``%load_ext jaxpipe``: registers the magics (imported only now)."""
    from jaxpipe.ipython import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """``%unload_ext jaxpipe``: removes exactly what loading added."""
    from jaxpipe.ipython import unload_ipython_extension as unload

    unload(ipython)
