"""The committed notebook runs top to bottom on real collected data."""

import json
from pathlib import Path

from harness import run_fastsock

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "dependency_history.ipynb"


def code_cells(path):
    notebook = json.loads(path.read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_cells_run(peers, tmp_path, monkeypatch):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-nb-srv")
    peers("client", "--connect", "127.0.0.1", str(server.info["port"]), "--name", "fs-nb-cli")
    run_fastsock("collect", "--once", "--data-dir", str(tmp_path))
    monkeypatch.setenv("FASTSOCK_DATA_DIR", str(tmp_path))

    namespace: dict = {}
    for source in code_cells(NOTEBOOK):
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)

    assert "fs-nb-cli" in namespace["edges"].column("comm").to_pylist()
    assert namespace["per_minute"].num_rows >= 1
