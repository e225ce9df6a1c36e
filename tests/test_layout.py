"""The package's shape: imports point one way down the data's path, the public names resolve,
and plotting never touches matplotlib's global backend."""

import ast
import json
import pathlib
import subprocess
import sys
import textwrap

import cnnjax

PACKAGE = pathlib.Path(cnnjax.__file__).parent
# What each subpackage may import of cnnjax (besides itself, the config and `cnnjax.imports`).
ALLOWED = {
    "report": set(),
    "data": set(),
    "nn": {"data"},
    "training": {"data", "nn", "report"},
    "search": {"data", "nn", "report", "training"},
    "visualize": {"data", "nn", "report", "training"},
    "lab": {"data", "nn", "report"},
    "compare": {"report", "training", "visualize"},
}


def _cnnjax_imports(path: pathlib.Path) -> set[str]:
    """The subpackages (or top-level modules) of cnnjax that a file imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "cnnjax" and len(parts) > 1:
                found.add(parts[1])
            elif name == "cnnjax" and isinstance(node, ast.ImportFrom):
                found.update(a.name for a in node.names)
    return found


def test_imports_point_down_the_data_path():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for target in _cnnjax_imports(path) - allowed - {package, "config", "imports", "notices"}:
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports cnnjax.{target}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    wrong = tmp_path / "bad.py"
    wrong.write_text("def f():\n    from cnnjax.visualize.actmax import ActMaxConfig\n"
                     "from cnnjax import training\n")
    assert _cnnjax_imports(wrong) == {"visualize", "training"}


def test_importing_the_training_loop_imports_no_visualization():
    code = textwrap.dedent("""
        import sys
        import cnnjax.training.loop, cnnjax.training.sweep, cnnjax.training.runs, cnnjax.cli
        print(sorted(m for m in sys.modules if m.startswith(("cnnjax.visualize", "cnnjax.lab"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_public_name_resolves():
    missing = [name for name in cnnjax.__all__ if getattr(cnnjax, name, None) is None]
    assert not missing and "train_and_evaluate" in cnnjax.__all__ and "Periodic" in cnnjax.__all__


def test_experiments_import_only_public_names():
    experiments = PACKAGE.parent / "experiments"
    bad = []
    for path in sorted(experiments.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnjax"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
                if node.module not in ("cnnjax", "cnnjax.lab", "cnnjax.lab.gradcheck"):
                    bad.append(f"{path.name}: from {node.module} (use the names in cnnjax.__all__)")
    assert not bad, "\n".join(bad)


def test_readme_python_uses_only_public_names():
    """The README's Python blocks import from `cnnjax` (and the lab) only, and every `cnnjax.X`
    they name is in `cnnjax.__all__`."""
    import re

    text = (PACKAGE.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    bad = []
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnjax"):
                if node.module not in ("cnnjax", "cnnjax.lab"):
                    bad.append(f"from {node.module} import ...")
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "cnnjax" and node.attr not in cnnjax.__all__):
                bad.append(f"cnnjax.{node.attr}")
    assert not bad, bad


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    """A notebook's backend survives cnnjax's plots, and pyplot is never imported."""
    records = [{"kind": "step", "epoch": 1, "step": s, "loss": 1.0 / s, "accuracy": 0.5,
                "grad_norm": 2.0, "grad_norm/conv1": 1.0} for s in (10, 20)]
    records.append({"kind": "epoch", "epoch": 1, "step": 20, "train_loss": 0.1,
                    "train_accuracy": 0.9, "val_loss": 0.2, "val_accuracy": 0.8,
                    "learning_rate": 1e-3, "improved": True})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code = textwrap.dedent(f"""
        import sys, pathlib
        import matplotlib
        matplotlib.use("svg")
        import numpy as np
        from cnnjax.report.plots import plot_run
        from cnnjax.visualize import feature_maps
        written = plot_run(pathlib.Path({str(tmp_path)!r}), confusion=[[3, 1], [0, 4]])
        feature_maps.save_png(pathlib.Path({str(tmp_path)!r}) / "grid.png",
                              feature_maps.channel_grid(np.random.rand(5, 5, 4)))
        fig = feature_maps.overview_figure(np.zeros((5, 5, 1)), {{"conv1": np.ones((5, 5, 2))}})
        feature_maps.save_figure(fig, pathlib.Path({str(tmp_path)!r}) / "overview.png")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, len(written))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svg", "False", "5"], out.stdout + out.stderr
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
