"""``transferlab samples``: a trained trial's captions or reconstruction grid, restored from the store.

Trials are recorded with the driver's own ``record_study`` and trained in-process with ``run_trial``
(no Ray), so the store holds exactly what a submitted study would.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import transferlab
from tests.store_helpers import trial as trial_record
from transferlab.cli.main import cli
from transferlab.engine.assembly import build_task
from transferlab.engine.trial import run_trial
from transferlab.service.driver import record_study
from transferlab.service.spec import validate_spec_text
from transferlab.service.store import Store

CAPTION = """
name: cap
study: single
backbone: {name: convnet, widths: [8, 16, 16]}
head: {name: caption, embed_dim: 8, hidden: 16}
task: {name: shapes, target: caption, image_size: 16, train_size: 16, val_size: 8, test_size: 8}
train: {epochs: 1, batch_size: 8, optimizer: adamw, lr: 0.003}
"""
VAE = """
name: vae
study: single
backbone: {name: convnet, widths: [8, 16]}
head: {name: vae, latent_dim: 4}
task: {name: digits, target: image}
train: {epochs: 1, batch_size: 64, optimizer: adamw, lr: 0.003}
"""
LABEL = """
name: lab
study: single
backbone: {name: convnet, widths: [8, 16]}
task: {name: digits}
train: {epochs: 1, batch_size: 64}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(db: str, runs: Path, text: str) -> int:
    """Record a single study and train its trial in-process, as the driver would."""
    vspec = validate_spec_text(textwrap.dedent(text), "spec.yaml")
    with Store.open(db) as store:
        exp_id = record_study(vspec, store, runs)
        for t in store.trials(exp_id):
            result, facts = run_trial(dict(t.config), checkpoint_path=t.config["checkpoint_path"])
            rows = [(result.test_epoch, "test", k, v) for k, v in result.test.items()]
            store.add_metrics(t.id, rows)
            store.finish_trial(
                t.id, "completed", checkpoint_path=str(result.checkpoint), data_hash=facts["data_hash"]
            )
    return exp_id


@pytest.fixture(scope="module")
def store_db(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("samples")
    db = f"sqlite:///{root / 'store.db'}"
    ids = {
        name: trained(db, root / "runs", text)
        for name, text in (("cap", CAPTION), ("vae", VAE), ("lab", LABEL))
    }
    return {"db": db, "root": root, **ids}


def test_caption_samples_show_reference_greedy_and_beam(store_db: dict) -> None:
    shown = transferlab.samples(store_db["cap"], db=store_db["db"], n=3, beam_size=2)
    assert shown["kind"] == "caption" and shown["trial"].key == "all/s0/single/d0"
    rows = shown["captions"]
    assert len(rows) == 3 and all(set(r) == {"reference", "greedy", "beam"} for r in rows)
    with Store.open(store_db["db"], create=False) as store:
        config = store.trials(store_db["cap"])[0].config
    task = build_task(config["task"]["name"], config["task"]["options"])
    assert [r["reference"] for r in rows] == task.dataset("test").extras["caption"][:3]
    assert all(isinstance(r["greedy"], str) and isinstance(r["beam"], str) for r in rows)

    result = CliRunner().invoke(
        cli, ["samples", "cap", "all/s0/single/d0", "--db", store_db["db"], "-n", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (
        result.output.count("reference:") == 2 and "greedy:" in result.output and "beam (3):" in result.output
    )


def test_image_samples_write_a_png_grid(store_db: dict, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["samples", "vae", "--db", store_db["db"], "-n", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output.replace("\n", "")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lab"], "predicts 'label' targets; samples shows caption targets"),
        (["cap", "no/such/trial"], "has no trial 'no/such/trial'; give a trial id or key"),
        (["nosuchexp"], "nosuchexp"),
    ],
)
def test_samples_refuses_what_it_cannot_show(store_db: dict, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["samples", *args, "--db", store_db["db"]])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert message in result.output and "Traceback" not in result.output


def test_changed_data_and_lost_checkpoints_are_refused(store_db: dict) -> None:
    with Store.open(store_db["db"], create=False) as store:
        t = store.trials(store_db["cap"])[0]
        store.finish_trial(t.id, "completed", data_hash="0" * 16)
    with pytest.raises(ValueError, match="changed since it trained"):
        transferlab.samples(store_db["cap"], db=store_db["db"])
    with Store.open(store_db["db"], create=False) as store:
        store.finish_trial(t.id, "completed", data_hash=t.data_hash)
        vae = store.trials(store_db["vae"])[0]
    moved = Path(vae.checkpoint_path).rename(Path(vae.checkpoint_path).with_suffix(".moved"))
    try:
        result = CliRunner().invoke(cli, ["samples", "vae", "--db", store_db["db"], "--out", "x.png"])
        assert result.exit_code == 1 and "checkpoint not found" in result.output, result.output
    finally:
        moved.rename(vae.checkpoint_path)


def test_multitask_trials_are_refused_by_name(store_db: dict) -> None:
    with Store.open(store_db["db"], create=False) as store:
        exp = store.find_experiment("lab").id
        config = {"study": "multitask", "trial_key": "mt", "tasks": {"cls": {}, "seg": {}}}
        [trial_id] = store.add_trials(exp, [trial_record("mt", "equal", config=config)]).values()
        store.finish_trial(trial_id, "completed", checkpoint_path=str(store_db["root"] / "mt.safetensors"))
    with pytest.raises(ValueError, match=r"trial \d+ \(mt\) is a multitask trial"):
        transferlab.samples("lab", "mt", db=store_db["db"])
