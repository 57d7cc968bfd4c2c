"""What a non-editable ``pip install .`` ships, checked against the source tree (setup.cfg).

An editable install finds every package on disk whatever setup.cfg lists; a wheel holds only
the listed ones, so a package missing from the list breaks ``import`` after a plain install.
The full check (a real ``pip install`` into a fresh venv, then the three commands) takes
minutes and is a manual step of the release (docs); this is its fast part.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import re
import sys
from pathlib import Path

from tests.mpi_helpers import REPO


def _setup() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    return config


def _listed(config: configparser.ConfigParser, key: str) -> list[str]:
    return [line.strip() for line in config["options"][key].strip().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _package_dirs(config: configparser.ConfigParser) -> dict[str, Path]:
    """Top-level package -> its directory (``package_dir`` mappings, else its own name)."""
    mapped = dict(re.split(r"\s*=\s*", line, maxsplit=1)
                  for line in _listed(config, "package_dir"))
    return {top: REPO / mapped.get(top, top) for top in ("mlbfgs_hpc", "mlbfgs_hpc_tools")}


def test_every_package_on_disk_is_listed() -> None:
    config = _setup()
    on_disk = set()
    for top, root in _package_dirs(config).items():
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            on_disk.add(".".join((top, *relative)))
    assert sorted(_listed(config, "packages")) == sorted(on_disk)


def test_console_scripts_point_into_listed_packages() -> None:
    config = _setup()
    packages = set(_listed(config, "packages"))
    scripts = [line.strip() for line in
               config["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert {s.split("=")[0].strip() for s in scripts} == {"mlbfgs-train", "mlbfgs-ckpt",
                                                          "mlbfgs-plot"}
    for script in scripts:
        target = script.split("=", 1)[1].strip()
        module, _, function = target.partition(":")
        assert module.rpartition(".")[0] in packages, script
        # From the source tree: mlbfgs_hpc_tools is tools/ (package_dir).
        source = re.sub(r"^mlbfgs_hpc_tools\b", "tools", module)
        assert callable(getattr(importlib.import_module(source), function)), script


def test_the_library_imports_only_declared_dependencies_at_import_time() -> None:
    """Module-level imports of ``mlbfgs_hpc`` are the standard library, the package itself
    or ``install_requires`` (optional ones, Horovod, scikit-learn, matplotlib, are imported
    where used)."""
    config = _setup()
    required = {re.split(r"[<>=!~;\s\[]", line)[0].lower().replace("-", "_")
                for line in _listed(config, "install_requires")}
    stdlib = set(sys.stdlib_module_names)
    for path in (REPO / "mlbfgs_hpc").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top == "mlbfgs_hpc" or top in required, (path, name)


def test_python_requires_is_what_the_code_needs() -> None:
    """3.11: ``hashlib.file_digest`` (checkpoint digests) and ``ProcessPoolExecutor``'s
    ``max_tasks_per_child`` (the benchmark runner) are 3.11 APIs."""
    assert _setup()["options"]["python_requires"].strip() == ">=3.11"
    assert "hashlib.file_digest(" in (REPO / "mlbfgs_hpc/checkpoint/h5io.py").read_text()
    assert "max_tasks_per_child=" in (REPO / "tools/bench/tta_runs.py").read_text()


def test_the_extra_mlbfgs_plot_names_exists() -> None:
    plot = importlib.import_module("tools.mlbfgs_plot")
    extra = re.search(r"mlbfgs-hpc\[(\w+)\]", plot.PLOT_EXTRA).group(1)
    extras = _setup()["options.extras_require"]
    assert "matplotlib" in extras[extra]
