"""jaxpipe: JAX transforms as a declarative, inspectable pipeline.

>>> from jaxpipe import Pipeline
>>> Pipeline(abs).grad().jit().explain()
'jax.jit(jax.grad(abs))'
"""

from jaxpipe._core.after_step import after_step_kind as after_step_kind
from jaxpipe._core.caches import clear_caches as clear_caches
from jaxpipe._core.run import FitRun as FitRun
from jaxpipe._core.stage import Stage as Stage
from jaxpipe._core.stage import StageContext as StageContext
from jaxpipe._core.stage import StageKind as StageKind
from jaxpipe._core.stage import Training as Training
from jaxpipe._core.state import TrainLoss as TrainLoss
from jaxpipe._core.state import TrainState as TrainState
from jaxpipe._core.state import loss_and_metrics as loss_and_metrics
from jaxpipe._core.state import split_init_key as split_init_key
from jaxpipe._pipeline import Pipeline as Pipeline
from jaxpipe._prng import KeyReuseWarning as KeyReuseWarning
from jaxpipe._prng import KeyTree as KeyTree
from jaxpipe._prng import key_tree as key_tree
from jaxpipe._tools.compile_cache import CompileEvents as CompileEvents
from jaxpipe._tools.compile_cache import disable_compilation_cache as disable_compilation_cache
from jaxpipe._tools.compile_cache import enable_compilation_cache as enable_compilation_cache
from jaxpipe._tools.inspection import Cost as Cost
from jaxpipe._tools.inspection import Memory as Memory
from jaxpipe._tools.inspection import Timing as Timing
from jaxpipe._tools.sharding import ShardingReport as ShardingReport
from jaxpipe._tools.sharding import sharding_report as sharding_report
from jaxpipe._tools.spec import SpecError as SpecError
from jaxpipe._tools.summary import ParamSummary as ParamSummary
from jaxpipe._tools.summary import param_summary as param_summary
from jaxpipe._training.early_stopping import EarlyStopping as EarlyStopping
from jaxpipe._training.evaluate import evaluate as evaluate
from jaxpipe._training.fit import fit as fit
from jaxpipe._training.history import History as History
from jaxpipe._training.tensorboard import TensorBoard as TensorBoard
from jaxpipe.errors import NonFiniteError as NonFiniteError
from jaxpipe.errors import PipelineError as PipelineError
from jaxpipe.errors import PluginError as PluginError
from jaxpipe.errors import PluginWarning as PluginWarning
from jaxpipe.errors import UnknownStageError as UnknownStageError
from jaxpipe.hookspecs import hookimpl as hookimpl

__all__ = [
    "CompileEvents",
    "EarlyStopping",
    "Cost",
    "FitRun",
    "History",
    "KeyReuseWarning",
    "KeyTree",
    "Memory",
    "NonFiniteError",
    "ParamSummary",
    "Pipeline",
    "PipelineError",
    "PluginError",
    "PluginWarning",
    "ShardingReport",
    "SpecError",
    "Stage",
    "StageContext",
    "StageKind",
    "TensorBoard",
    "Timing",
    "TrainLoss",
    "TrainState",
    "Training",
    "UnknownStageError",
    "after_step_kind",
    "clear_caches",
    "disable_compilation_cache",
    "enable_compilation_cache",
    "evaluate",
    "fit",
    "hookimpl",
    "key_tree",
    "loss_and_metrics",
    "param_summary",
    "sharding_report",
    "split_init_key",
]

__version__ = "0.1.0"


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """``%load_ext jaxpipe``: registers the magics (imported only now)."""
    from jaxpipe.ipython import load_ipython_extension as load  # the notebook layer, below this front door

    load(ipython)


def unload_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """``%unload_ext jaxpipe``: removes exactly what loading added."""
    from jaxpipe.ipython import unload_ipython_extension as unload

    unload(ipython)
