"""Layout rules (docs/contributing.md), on the source tree: one module names DeepSpeed internals, the two clients of
the method core (`fishds train`, the HF callback) do not import each other, and the tables (selection rules, PEFT
methods, data formats) are what the config accepts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DS_INTERNALS = re.compile(r"_hp_mapping|fp32_partitioned_groups_flat|\.ds_tensor|parameter_offload|bit16_groups")


def test_deepspeed_internals_are_named_in_zero_py_only():
    naming = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "fishds").rglob("*.py") if DS_INTERNALS.search(p.read_text())
    )
    assert naming == ["fishds/zero.py"]


@pytest.mark.parametrize(
    "client,other", [("fishds.integrations.hf", "fishds.run.train"), ("fishds.run.train", "fishds.integrations")]
)
def test_clients_of_the_core_do_not_import_each_other(client, other):
    code = (
        f"import sys, {client}; "
        f"loaded = [m for m in sys.modules if m == {other!r} or m.startswith({other!r} + '.')]; "
        "assert not loaded, loaded; assert 'fishds.fish.selection' in sys.modules"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tables_are_the_config_choices():
    from fishds.config import Config, DataSection, FishSection, PeftSection
    from fishds.fish.selection import RULES
    from fishds.methods import METHODS
    from fishds.run.formats import FORMATS

    for name in RULES:
        assert FishSection(selection=name).selection == name
        assert f"{name}: {RULES[name].doc}" in FishSection.model_fields["selection"].description
    for name in METHODS:
        assert PeftSection(method=name).method == name
    for name in FORMATS:
        assert DataSection(path="x", format=name).format == name
    with pytest.raises(ValueError, match="fish.selection"):
        Config.model_validate(
            {
                "model": {"name_or_path": "m"},
                "data": {"path": "x"},
                "output_dir": "o",
                "fish": {"selection": "not-a-rule"},
            }
        )


def test_callback_arguments_are_validated_by_the_fish_section():
    from fishds.integrations.hf import FishCallback, FishError

    fish = FishCallback(selection="random", num_selected=5, warmup_steps=2)
    assert (fish.selection, fish.num_selected, fish.keep_ratio, fish.warmup_steps) == ("random", 5, None, 2)
    assert FishCallback().keep_ratio == 0.5  # the section's default, as in fishds train
    for bad, needle in (
        ({"selection": "best"}, "selection"),
        ({"keep_ratio": 1.5}, "keep_ratio=1.5"),
        ({"granularity": "token"}, "granularity"),
        ({"num_samples": 0}, "num_samples"),
    ):
        with pytest.raises(FishError, match=needle):
            FishCallback(**bad)


def test_one_adapter_key_parser():
    import torch

    from fishds.fish.adapter import mask_report
    from fishds.fish.keys import parse_key

    class T:  # a pool tensor stand-in
        def __init__(self, name, numel):
            self.name, self.numel, self.shape = name, numel, (numel,)

    class P:
        tensors = [
            T("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", 4),
            T("base_model.model.model.layers.1.mlp.down_proj.ia3_l.default", 2),
        ]

    masks = {t.name: torch.ones(t.numel, dtype=torch.bool) for t in P.tensors}
    report = mask_report(P, masks)
    assert (
        sorted(report["per_module"]) == sorted(parse_key(t.name).module for t in P.tensors) == ["down_proj", "q_proj"]
    )
    assert report["share"] == {"lora_A": 4 / 6, "lora_B": 0.0, "other": 2 / 6}


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The fishds modules `path` imports anywhere (module level and inside functions; relative imports resolved;
    the packages above an imported module included, since importing it runs their __init__)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            named.add(base)
            named.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for mod in named:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        while mod:
            if mod != name:
                out.add(mod)
            mod = mod.rpartition(".")[0]
    return out


def test_fishds_has_no_import_cycle():
    """Following every import statement, module level and function level alike, no fishds module reaches itself
    (a function-level import cannot hide a circle)."""
    files = {}
    for p in (ROOT / "fishds").rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {name: _imports(p, name, set(files)) for name, p in files.items()}
    assert len(graph) > 40 and "fishds.config" in graph["fishds.run.train"]  # the scan sees the package
    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_schema_is_a_leaf_and_the_error_one_class():
    from fishds import config, schema
    from fishds.fish import config as fish_config

    assert _imports(ROOT / "fishds" / "schema.py", "fishds.schema", {"fishds", "fishds.config"}) == set()
    assert config.ConfigError is schema.ConfigError and config.FishSection is fish_config.FishSection


def test_bench_scripts_find_the_bench_package_without_pythonpath():
    """`python bench/X.py` puts bench/ (not the repository) on sys.path, and the editable install holds fishds alone:
    a script importing bench._comm / bench._session must insert the repository root first (CI runs without
    PYTHONPATH)."""
    missing = []
    for p in sorted((ROOT / "bench").glob("*.py")):
        text = p.read_text()
        first = re.search(r"^\s*from bench\.|^\s*import bench\.", text, re.M)
        if first is None:
            continue
        root_line = re.search(
            r"^sys\.path\.insert\(0, str\((ROOT|Path\(__file__\)\.resolve\(\)\.parents\[1\])\)\)", text, re.M
        )
        if root_line is None or root_line.start() > first.start():
            missing.append(p.name)
    assert not missing, f"bench scripts importing bench.* before putting the repository on sys.path: {missing}"


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after():
    """fishds.zero.import_deepspeed (used by fishds.dist.init_distributed): DeepSpeed's autotuner would import mlflow
    (~3 s per rank) at `import deepspeed`; after it, `import mlflow` (train.report_to: mlflow) still works."""
    pytest.importorskip("mlflow")
    code = (
        "import sys; from fishds import zero; ds = zero.import_deepspeed(); "
        "assert 'deepspeed.autotuning.autotuner' in sys.modules and 'mlflow' not in sys.modules, "
        "[m for m in sys.modules if m.startswith('mlflow')][:3]; "
        "import mlflow; assert mlflow.__version__; assert zero.import_deepspeed() is ds"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
