"""examples/plugin-example: its backbone, head and task are found through entry points, pass their
contract checks, run a transfer study together through Ray, and a broken plugin beside them breaks
nothing. CI installs the package (`make install`); without it these tests fail, they never skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from click.testing import CliRunner

import transferlab
from transferlab.cli.main import cli
from transferlab.service.store import Store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-example"
DIST = "transferlab-plugin-example"
COMPONENTS = {"tinyvgg": "backbone", "pooled_mlp": "head", "stripes": "task"}


def require_distribution(name: str) -> None:
    """Fail (never skip) when the example package is not installed: CI must run these tests."""
    try:
        distribution(name)
    except PackageNotFoundError:
        pytest.fail(
            f"the example plugin package '{name}' is not installed; run `make install` "
            f"(or `.venv/bin/pip install -e {EXAMPLE.relative_to(ROOT)}`)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def example_installed() -> None:
    require_distribution(DIST)


def test_a_missing_package_fails_with_how_to_install_it() -> None:
    with pytest.raises(
        pytest.fail.Exception, match=r"run `make install` \(or `.venv/bin/pip install -e examples"
    ):
        require_distribution("transferlab-plugin-not-installed")


def test_components_are_listed_with_their_package() -> None:
    result = CliRunner().invoke(cli, ["plugins", "list", "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["plugins"]}
    for name, kind in COMPONENTS.items():
        assert (rows[name]["kind"], rows[name]["source"]) == (kind, DIST)
    assert rows["tinyvgg"]["description"].startswith("VGG-style stages")
    assert rows["pooled_mlp"]["description"].startswith("Avg+max pooled last stage")
    assert rows["stripes"]["description"].startswith("Procedural striped patterns in 6 classes")


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_plugins_check_passes(name: str) -> None:
    result = CliRunner().invoke(cli, ["plugins", "check", name])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{COMPONENTS[name]} '{name}' from {DIST}\n")
    assert "FAIL" not in result.output and result.output.rstrip().endswith("checks passed")


def test_plugins_check_head_on_the_example_task() -> None:
    result = CliRunner().invoke(cli, ["plugins", "check", "pooled_mlp", "--task", "stripes", "-O", "json"])
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["ok"], result.output
    outputs = {c["name"]: c["detail"] for c in data["checks"]}
    assert outputs["output on stripes"] == "logits (4, 6)"


def test_stripes_is_deterministic_and_subsets_keep_their_samples() -> None:
    from transferlab.engine.assembly import build_task

    full, again = build_task("stripes", {"image_size": 16}), build_task("stripes", {"image_size": 16})
    a = build_task("stripes", {"image_size": 16}, classes=[3, 5])
    first, second = full.dataset("train"), again.dataset("train")
    assert first.tensors["image"].equal(second.tensors["image"])
    assert first.tensors["label"].bincount().tolist() == [200] * 6  # balanced
    picked = (first.tensors["label"] == 3) | (first.tensors["label"] == 5)
    assert a.dataset("train").tensors["image"].equal(first.tensors["image"][picked])
    assert a.target.class_names == ("antidiagonal", "rings")
    assert full.fingerprint() != build_task("stripes", {"image_size": 16, "seed": 1}).fingerprint()


@pytest.mark.slow
def test_a_study_with_all_three_runs_end_to_end(ray_session, tmp_path: Path) -> None:
    spec = EXAMPLE / "stripes-transfer.yaml"
    db = f"sqlite:///{tmp_path / 'store.db'}"
    exp_id = transferlab.submit(spec, db=db, runs_dir=tmp_path / "runs")
    store = Store.open(db, create=False)
    info = store.find_experiment(exp_id)
    trials = store.trials(info.id)
    assert info.status == "completed" and info.name == "stripes-transfer"
    assert len(trials) == 12  # baseA, baseB + 2 depths x 5 conditions
    assert {t.status for t in trials} == {"completed"}, [(t.key, t.error) for t in trials]
    assert sorted({t.depth for t in trials}) == [0, 1, 2]
    store.close()
    frame = transferlab.results(exp_id, db=db)
    assert len(frame) == 12 and frame["value"].between(0, 1).all()
    metrics = transferlab.metrics(exp_id, db=db)
    assert set(metrics[metrics.split == "val"].epoch) == {1, 2}


BROKEN_METADATA = "Metadata-Version: 2.1\nName: transferlab-broken-example\nVersion: 0.1\n"
BROKEN_ENTRY_POINTS = textwrap.dedent(
    """
    [transferlab.backbones]
    brokenvgg = transferlab_broken_example:brokenvgg
    [transferlab.heads]
    missinghead = transferlab_missing_module:head
    """
)
CLI_SESSION = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner
    from transferlab.cli.main import cli

    commands = {
        "list": ["plugins", "list", "-O", "json"],
        "check tinyvgg": ["plugins", "check", "tinyvgg"],
        "validate": ["validate", sys.argv[1]],
        "check brokenvgg": ["plugins", "check", "brokenvgg"],
    }
    results = {key: CliRunner().invoke(cli, args) for key, args in commands.items()}
    print(json.dumps({key: [r.exit_code, r.stdout, r.stderr] for key, r in results.items()}))
    """
)


def test_a_broken_plugin_is_listed_and_breaks_nothing(tmp_path: Path) -> None:
    """A second installed distribution whose plugins fail to import, found by importlib.metadata."""
    dist_info = tmp_path / "transferlab_broken_example-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(BROKEN_METADATA)
    (dist_info / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    (tmp_path / "transferlab_broken_example.py").write_text("raise ImportError('needs libacme.so')\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", CLI_SESSION, str(EXAMPLE / "stripes-transfer.yaml")],
        env={**os.environ, "PYTHONPATH": path},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout.splitlines()[-1])

    code, stdout, _ = runs["list"]
    listing = json.loads(stdout)
    assert code == 0
    assert sorted(listing["failed"], key=lambda f: f["name"]) == [
        {
            "name": "brokenvgg",
            "kind": "backbone",
            "source": "transferlab-broken-example",
            "target": "transferlab_broken_example:brokenvgg",
            "error": "ImportError: needs libacme.so",
        },
        {
            "name": "missinghead",
            "kind": "head",
            "source": "transferlab-broken-example",
            "target": "transferlab_missing_module:head",
            "error": "ModuleNotFoundError: No module named 'transferlab_missing_module'",
        },
    ]
    sources = {r["name"]: r["source"] for r in listing["plugins"]}
    assert {name: sources[name] for name in COMPONENTS} == dict.fromkeys(COMPONENTS, DIST)
    assert sources["convnet"] == sources["classify"] == sources["digits"] == "transferlab"

    code, stdout, stderr = runs["check tinyvgg"]
    assert code == 0 and stdout.endswith("all 13 checks passed\n"), stderr
    code, stdout, stderr = runs["validate"]
    assert code == 0, stderr
    assert "stripes-transfer (transfer study): 12 trials" in " ".join(stdout.split())
    code, _, stderr = runs["check brokenvgg"]
    assert code == 1
    assert "plugin 'brokenvgg' failed to import; see `transferlab plugins list`" in stderr
