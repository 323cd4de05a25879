"""Every notebooks/*.ipynb runs top to bottom (nbclient) on the demo group, within 5 minutes each."""

import os
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, demo_group, tiny, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    if "ensure_wide_group" in path.read_text():  # built once per session (test_circuits usually did it already),
        from saelab.demo import ensure_wide_group  # like the demo group: the notebook's own time excludes it

        ensure_wide_group(demo_group.root, progress=False, model=tiny)

    monkeypatch.setenv("SAELAB_DEMO_DIR", str(demo_group.root))  # ensure_group() in the notebook reuses it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
