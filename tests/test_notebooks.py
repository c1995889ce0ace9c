"""Every notebook in examples/ runs top to bottom in a real IPython kernel, and shows what it promises.

Add a notebook to examples/ and it is executed here; add a function to CHECKS to
assert on its outputs (the text, images and widgets its cells produced).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


def outputs(cell: nbformat.NotebookNode) -> tuple[str, set[str]]:
    """The cell's text (streams and plain-text results) and the MIME types it displayed."""
    text, kinds = [], set()
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            kinds.update(out.data)
            text.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            text.append(f"{out.ename}: {out.evalue}")
    return "".join(text), kinds


def cell_with(nb: nbformat.NotebookNode, source: str) -> tuple[str, set[str]]:
    """Outputs of the one code cell whose source contains ``source``."""
    found = [c for c in nb.cells if c.cell_type == "code" and source in c.source]
    assert len(found) == 1, f"expected one cell containing {source!r}, found {len(found)}"
    return outputs(found[0])


def check_training(nb: nbformat.NotebookNode) -> None:
    text, _ = cell_with(nb, "print(trainer.explain())")
    assert "def train_step(state, batch):" in text and "jax.value_and_grad(model_loss, has_aux=True)" in text
    text, _ = cell_with(nb, "jaxpipe.param_summary(state.params)")
    assert "Dense_0/kernel  (64, 128)" in text and "total: 26,122 parameters in 6 arrays" in text
    text, _ = cell_with(nb, "one_step, metrics = trainer(state, batch)")
    assert re.match(r"1 \{'grad_norm': [\d.]+, 'learning_rate': 0.0, 'loss': [\d.]+\}", text)
    text, kinds = cell_with(nb, "hooks=[history]")
    assert WIDGET in kinds  # tqdm.auto: a progress widget in a notebook
    assert "epoch 15: eval_accuracy=" in text
    text, _ = cell_with(nb, "test accuracy:")
    accuracy = float(re.search(r"test accuracy: ([\d.]+) after 150 steps", text).group(1))
    assert accuracy >= 0.95
    _, kinds = cell_with(nb, "plt.show()")
    assert "image/png" in kinds
    text, _ = cell_with(nb, "per_example = Pipeline(example_loss)")
    assert "jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0)))" in text
    assert "per-example gradient of Dense_0/kernel: (397, 64, 128)" in text
    text, _ = cell_with(nb, "bit-identical")
    assert "state.key == split(init key)[0]: True" in text and "same seed, bit-identical: True" in text


def check_inspector(nb: nbformat.NotebookNode) -> None:
    text, kinds = cell_with(nb, "per_example = Pipeline(loss)")
    assert "text/html" in kinds and text == "Pipeline(loss).grad().vmap(in_axes=(None, 0, 0, None)).jit()"
    text, kinds = cell_with(nb, "show_inspector(per_example")
    assert WIDGET in kinds and "jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, None)))" in text
    text, kinds = cell_with(nb, "trainer.fit(")
    assert WIDGET in kinds  # the dashboard, and no tqdm bar beside it (fit may add a line on its steps per call)
    assert text.startswith(
        "fit dashboard of Pipeline(batch_loss).optimize(tx=GradientTransformationExtraArgs(...)).jit()"
    )
    text, kinds = cell_with(nb, "show_tree(state.params)")
    assert "text/html" in kinds and "'w': # jax.Array float32(8,)" in text


CHECKS: dict[str, Callable[[nbformat.NotebookNode], None]] = {
    "training.ipynb": check_training,
    "inspector.ipynb": check_inspector,
}


def test_training_notebook_is_present():
    assert EXAMPLES / "training.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    for cell in nb.cells:
        text, _ = outputs(cell)
        assert "Traceback" not in text, text
    check = CHECKS.get(path.name)
    if check is not None:
        check(nb)
