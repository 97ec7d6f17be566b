"""Spec validation through the CLI (bad inputs are refused with the field and the value, and nothing
is written) and the planner's trial graph. No Ray: ``submit`` only ever sees specs that fail."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from transferlab.cli.main import cli
from transferlab.service.planner import plan_trials
from transferlab.service.spec import CONDITIONS, load_spec
from transferlab.service.spec_yaml import SpecError
from transferlab.service.store import Store

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
DELETE = object()


def invoke(*args: str) -> Result:
    # A wide terminal so rich does not wrap messages and tables.
    return CliRunner(env={"COLUMNS": "250"}).invoke(cli, list(args))


def edited(spec_text: str, edits: dict[str, Any]) -> str:
    """``spec_text`` with dotted keys set to new values (``DELETE`` removes the key)."""
    data = yaml.safe_load(spec_text)
    for dotted, value in edits.items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):  # ``task: digits`` becomes ``{name: digits}``
                node[part] = {"name": node[part]} if isinstance(node.get(part), str) else {}
            node = node[part]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def write(folder: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- a catalogue of bad specs ------------------------------------------------------------------------
# (edits to the tiny spec, fragments the error must contain: the field, the bad value, the fix)
BAD_EDITS = [
    pytest.param(
        {"backbone": {"name": "lenet5"}, "task.image_size": 16},
        ["task: a 1x16x16 input does not fit backbone 'lenet5' with head 'classify'"],
        id="input-too-small-for-backbone",
    ),
    pytest.param(
        {"backbone": {"name": "lenet5", "activation": "sigmoid"}, "task.image_size": 32},
        ["backbone: lenet5: activation must be 'tanh' or 'relu', got 'sigmoid'"],
        id="bad-backbone-option-value",
    ),
    pytest.param(
        {"train.device": "cuda"},
        ["train.device: 'cuda' needs resources.gpu > 0"],
        id="cuda-without-gpu-resource",
    ),
    pytest.param(
        {"backbone.name": "convnett"},
        [
            "backbone.name: backbone 'convnett' is not registered; did you mean 'convnet'?",
            "`transferlab plugins list --kind backbone`",
        ],
        id="unknown-backbone",
    ),
    pytest.param(
        {"head": "clasify"},
        ["head.name: head 'clasify' is not registered; did you mean 'classify'"],
        id="unknown-head",
    ),
    pytest.param(
        {"task.name": "digitz"},
        ["task.name: task 'digitz' is not registered; did you mean 'digits'", "--kind task"],
        id="unknown-task",
    ),
    pytest.param(
        {"backbone": "timm/resnet81"},
        ["backbone: timm has no model 'resnet81'; did you mean resnet18"],
        id="unknown-timm-model",
    ),
    pytest.param(
        {"backbone": "lenet5", "task.image_size": 32, "transfer.depths": [6]},
        ["transfer.depths: depth 6 is deeper than backbone 'lenet5' (5 stages: c1, s2, c3, s4, c5)"],
        id="depth-deeper-than-backbone",
    ),
    pytest.param(
        {"transfer.depths": [0, 1]},
        ["transfer.depths.0: Input should be greater than or equal to 1 (got 0)"],
        id="depth-zero",
    ),
    pytest.param(
        {"transfer.depths": "alll"},
        ["transfer.depths: Input should be 'all' (got 'alll')"],
        id="depths-misspelt-all",
    ),
    pytest.param(
        {"train.epochs": "ten"},
        ["train.epochs: Input should be a valid integer", "(got 'ten')"],
        id="wrong-type",
    ),
    pytest.param(
        {"train.lr": -0.1},
        ["train.lr: Input should be greater than 0 (got -0.1)"],
        id="negative-lr",
    ),
    pytest.param(
        {"train": DELETE, "trian": {"epochs": 2}},
        ["trian: unknown key; did you mean 'train'?"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        {"train.epochz": 2},
        ["train.epochz: unknown key; did you mean 'epochs'? (allowed: epochs, batch_size,"],
        id="unknown-nested-key",
    ),
    pytest.param(
        {"transfer.split.Bb": [1]},
        ["transfer.split.Bb: unknown key; did you mean 'B'? (allowed: A, B)"],
        id="unknown-split-key",
    ),
    pytest.param(
        {"backbone.widthz": [4, 8]},
        ["backbone: backbone 'convnet' has no option 'widthz'; its options are: in_channels, widths,"],
        id="unknown-backbone-option",
    ),
    pytest.param(
        {"task.image_sise": 16},
        ["task: task 'digits' has no option 'image_sise'; its options are: image_size,"],
        id="unknown-task-option",
    ),
    pytest.param(
        {"transfer.split": {"A": [0, 1, 2, 3, 4], "B": [4, 5, 6]}},
        ["transfer.split: classes [4] are in both A and B; the halves must be disjoint"],
        id="overlapping-classes",
    ),
    pytest.param(
        {"transfer.split": {"A": [0, 1, 2, 3, 4], "B": [5, 6, 12]}},
        ["transfer.split.B: classes [12] do not exist; the task has classes 0..9"],
        id="class-out-of-range",
    ),
    pytest.param(
        {"transfer.split": {"random": True, "seeds": [3, 3]}},
        ["transfer.split.seeds: seeds list one twice: [3, 3]"],
        id="random-split-duplicate-seeds",
    ),
    pytest.param(
        {"transfer.split": {"random": True, "seeds": [0], "a_classes": 10}},
        ["transfer.split.a_classes: must leave at least 2 classes in each half: 2..8 (got 10)"],
        id="random-split-all-classes-in-A",
    ),
    pytest.param(
        {"transfer.split": {"random": True, "seeds": [0], "a_classes": 1}},
        ["transfer.split.a_classes: must leave at least 2 classes in each half: 2..8 (got 1)"],
        id="random-split-one-class-in-A",
    ),
    pytest.param({"seeds": [0, 0]}, ["seeds: seeds list one twice: [0, 0]"], id="duplicate-seeds"),
    pytest.param(
        {"transfer": DELETE},
        ["study 'transfer' needs a 'transfer' section (split, depths, conditions)"],
        id="missing-transfer-section",
    ),
    pytest.param(
        {"resources.cpu": -1},
        ["resources.cpu: Input should be greater than 0 (got -1)"],
        id="negative-cpu",
    ),
    pytest.param(
        {"train.stage_lr_mult": [1.0, 0.1]},
        ["train.stage_lr_mult: needs one multiplier per stage: 3 (conv1, conv2, conv3), got 2"],
        id="stage-lr-mult-length",
    ),
    pytest.param(
        {"transfer.conditions": ["AnB", "AnC"]},
        ["transfer.conditions.1: Input should be 'AnB', 'AnB+', 'BnB', 'BnB+' or 'random' (got 'AnC')"],
        id="unknown-condition",
    ),
    pytest.param(
        {"description": list(range(1_000))},
        ["description: Input should be a valid string (got [0, 1, 2, 3, 4, 5, 6, 7, ...])"],
        id="huge-bad-value-shown-short",
    ),
]

ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([prev] * 9)}]\n"
    for name, prev in zip("abcdefghi", ['"lol"', *("*" + c for c in "abcdefgh")], strict=True)
)

# (file content, fragments the error must contain)
BAD_FILES = [
    pytest.param(
        "name: tiny\nstudy: transfer\n  backbone: [lenet5\n", ["invalid YAML", "line 3"], id="broken-yaml"
    ),
    pytest.param(
        "name: tiny\nstudy: transfer\nname: other\n",
        ["invalid YAML: duplicate key 'name' (first on line 1)", "line 3"],
        id="duplicate-keys",
    ),
    pytest.param(
        "name: tiny\nbackbone: !!python/object/apply:os.system ['echo pwned']\n",
        ["invalid YAML", "tag:yaml.org,2002:python/object/apply:os.system"],
        id="python-object-tag",
    ),
    pytest.param("", ["spec.yaml: the spec is empty"], id="empty-file"),
    pytest.param("# only a comment\n", ["spec.yaml: the spec is empty"], id="only-comments"),
    pytest.param(
        b"\x7fELF\x02\x01\x01\x00\x00\x00",
        ["spec.yaml: binary file (contains NUL bytes); a spec is a YAML text file"],
        id="binary-file",
    ),
    pytest.param(b"name: caf\xe9\n", ["spec.yaml: not UTF-8 text"], id="not-utf8"),
    pytest.param(
        "- lenet5\n- digits\n",
        ["spec.yaml: a spec must be a mapping of keys to values, got a list"],
        id="list-not-mapping",
    ),
    pytest.param("just words\n", ["a spec must be a mapping of keys to values, got a str"], id="scalar"),
    pytest.param(
        ALIAS_BOMB,
        ["invalid YAML: aliases expand to more than 10000 values; refusing a possible alias bomb"],
        id="billion-laughs",
    ),
    pytest.param(
        "name: tiny\nbackbone: &loop {name: convnet, widths: [*loop]}\n",
        ["invalid YAML: recursive alias *loop inside its own anchor"],
        id="recursive-alias",
    ),
]

SUBMIT_SUBSET = {"unknown-backbone", "depth-deeper-than-backbone", "wrong-type", "unknown-top-level-key"}


def assert_refused(result: Result, fragments: list[str]) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize(("edits", "fragments"), BAD_EDITS)
def test_validate_refuses_bad_spec(
    workdir: Path, tiny_spec: Path, edits: dict[str, Any], fragments: list[str]
) -> None:
    spec = write(workdir, edited(tiny_spec.read_text(), edits))
    before = files_in(workdir)
    result = invoke("validate", str(spec))
    assert_refused(result, [f"{spec}: ", *fragments])
    assert files_in(workdir) == before  # no store, no runs folder


@pytest.mark.parametrize(("content", "fragments"), BAD_FILES)
def test_validate_refuses_bad_file(workdir: Path, content: str | bytes, fragments: list[str]) -> None:
    spec = write(workdir, content)
    start = time.perf_counter()
    result = invoke("validate", str(spec))
    assert time.perf_counter() - start < 5  # an alias bomb is refused, not expanded
    assert_refused(result, fragments)
    assert len(result.output) < 2_000
    assert files_in(workdir) == {"spec.yaml"}


def test_validate_refuses_missing_file(workdir: Path) -> None:
    result = invoke("validate", "nowhere/spec.yaml")
    assert_refused(result, ["nowhere/spec.yaml: file not found"])
    assert files_in(workdir) == set()


def test_validate_refuses_a_folder(workdir: Path) -> None:
    (workdir / "specs.yaml").mkdir()
    result = invoke("validate", "specs.yaml")
    assert result.exit_code == 2  # click refuses it before transferlab reads anything
    assert "is a directory" in result.output


@pytest.mark.parametrize(("edits", "fragments"), [p for p in BAD_EDITS if p.id in SUBMIT_SUBSET])
def test_submit_refuses_bad_spec_and_writes_nothing(
    workdir: Path, tiny_spec: Path, edits: dict[str, Any], fragments: list[str]
) -> None:
    spec = write(workdir, edited(tiny_spec.read_text(), edits))
    before = files_in(workdir)
    result = invoke("submit", str(spec), "--db", f"sqlite:///{workdir}/x.db")
    assert_refused(result, fragments)
    assert not (workdir / "x.db").exists()
    assert files_in(workdir) == before


@pytest.mark.parametrize(
    ("content", "fragments"), [p for p in BAD_FILES if p.id in {"duplicate-keys", "billion-laughs"}]
)
def test_submit_refuses_bad_file_and_writes_nothing(
    workdir: Path, content: str | bytes, fragments: list[str]
) -> None:
    spec = write(workdir, content)
    result = invoke("submit", str(spec), "--db", f"sqlite:///{workdir}/x.db")
    assert_refused(result, fragments)
    assert files_in(workdir) == {"spec.yaml"}


def test_submit_bad_spec_leaves_existing_store_untouched(workdir: Path, tiny_spec: Path) -> None:
    url = f"sqlite:///{workdir}/store.db"
    Store.open(url).close()  # an existing, empty store
    spec = write(workdir, edited(tiny_spec.read_text(), {"transfer.depths": [1, 9]}))
    result = invoke("submit", str(spec), "--db", url)
    assert_refused(result, ["transfer.depths: depth 9 is deeper than backbone 'convnet' (3 stages"])
    store = Store.open(url, create=False)
    try:
        assert store.experiments() == []
    finally:
        store.close()


def test_submit_default_store_not_created_for_bad_spec(workdir: Path, tiny_spec: Path) -> None:
    spec = write(workdir, edited(tiny_spec.read_text(), {"backbone.name": "convnett"}))
    before = files_in(workdir)
    result = invoke("submit", str(spec))  # default store: ./transferlab.db
    assert_refused(result, ["did you mean 'convnet'?"])
    assert files_in(workdir) == before
    assert not (workdir / "transferlab.db").exists()


def test_every_problem_is_listed_at_once(workdir: Path, tiny_spec: Path) -> None:
    spec = write(workdir, edited(tiny_spec.read_text(), {"train.lr": 0, "seeds": [1, 1], "trian": 1}))
    result = invoke("validate", str(spec))
    assert_refused(
        result, ["train.lr: Input should be greater than 0", "seeds: seeds list one twice", "trian:"]
    )


def test_api_error_lists_field_and_message(tmp_path: Path, tiny_spec: Path) -> None:
    spec = write(tmp_path, edited(tiny_spec.read_text(), {"transfer.depths": [2, 4], "resources.gpu": -1}))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.source == str(spec)
    assert info.value.problems == [("resources.gpu", "Input should be greater than or equal to 0 (got -1)")]
    spec = write(tmp_path, edited(tiny_spec.read_text(), {"transfer.depths": [2, 4]}))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.problems == [
        ("transfer.depths", "depth 4 is deeper than backbone 'convnet' (3 stages: conv1, conv2, conv3)")
    ]


# -- specs that validate ---------------------------------------------------------------------------
def test_validate_quickstart_prints_plan(workdir: Path) -> None:
    result = invoke("validate", str(QUICKSTART))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        "quickstart (transfer study): 17 trials; backbone convnet "
        "(5 stages: conv1, conv2, conv3, conv4, conv5), head classify, "
        "task digits (primary metric accuracy)"
    )
    lines = result.output.splitlines()
    cells = {
        row[0]: row[1:]
        for line in lines
        if line.startswith(("│", "┃"))
        for row in [[c.strip() for c in line.strip("│┃ ").replace("┃", "│").split("│")]]
    }
    assert cells["condition"] == ["d0", "d1", "d3", "d5", "total"]
    assert cells["baseA"] == ["1", "", "", "", "1"]
    assert cells["baseB"] == ["1", "", "", "", "1"]
    for condition in CONDITIONS:
        assert cells[condition] == ["", "1", "1", "1", "3"]
    assert "trials per role: base: 2, transfer: 15" in result.output
    assert "trials per seed: 0: 17" in result.output
    assert files_in(workdir) == set()  # validate writes nothing


def test_validate_quickstart_json(workdir: Path) -> None:
    result = invoke("validate", str(QUICKSTART), "--output", "json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["trials"] == 17
    assert (plan["name"], plan["study"]) == ("quickstart", "transfer")
    assert plan["stages"] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert plan["role"] == {"base": 2, "transfer": 15}
    assert plan["condition"] == {"baseA": 1, "baseB": 1, **{c: 3 for c in CONDITIONS}}
    assert plan["depth"] == {"0": 2, "1": 5, "3": 5, "5": 5}
    assert plan["split"] == {"given": 17}
    assert files_in(workdir) == set()


def plan_json(folder: Path, text: str) -> dict[str, Any]:
    result = invoke("validate", str(write(folder, text)), "-O", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_validate_random_split(workdir: Path, tiny_spec: Path) -> None:
    text = edited(
        tiny_spec.read_text(), {"transfer.split": {"random": True, "seeds": [0, 1]}, "seeds": [0, 1, 2]}
    )
    plan = plan_json(workdir, text)
    per_split_and_seed = 2 + 2 * len(CONDITIONS)  # baseA, baseB + 2 depths x 5 conditions
    assert plan["trials"] == 2 * 3 * per_split_and_seed
    assert plan["split"] == {"random-0": 3 * per_split_and_seed, "random-1": 3 * per_split_and_seed}
    assert plan["seed"] == {str(s): 2 * per_split_and_seed for s in (0, 1, 2)}


def test_small_aliases_are_allowed(workdir: Path, tiny_spec: Path) -> None:
    seeds = [0, 1]  # one object twice: YAML writes an anchor and an alias
    text = edited(tiny_spec.read_text(), {"transfer.split": {"random": True, "seeds": seeds}, "seeds": seeds})
    assert "&id001" in text and "*id001" in text
    plan = plan_json(workdir, text)
    assert plan["trials"] == 2 * 2 * (2 + 2 * len(CONDITIONS))


def test_validate_depths_all_expands_to_every_stage(workdir: Path, tiny_spec: Path) -> None:
    plan = plan_json(workdir, edited(tiny_spec.read_text(), {"transfer.depths": "all"}))
    assert plan["stages"] == ["conv1", "conv2", "conv3"]
    assert plan["depth"] == {"0": 2, "1": 5, "2": 5, "3": 5}
    lenet = edited(
        tiny_spec.read_text(), {"backbone": "lenet5", "task.image_size": 32, "transfer.depths": "all"}
    )
    plan = plan_json(workdir, lenet)
    assert plan["stages"] == ["c1", "s2", "c3", "s4", "c5"]
    assert sorted(plan["depth"], key=int) == ["0", "1", "2", "3", "4", "5"]
    assert plan["trials"] == 2 + 5 * len(CONDITIONS)


# -- the planner ------------------------------------------------------------------------------------
def planned(folder: Path, spec_text: str, edits: dict[str, Any] | None = None) -> list[Any]:
    return plan_trials(load_spec(write(folder, edited(spec_text, edits or {}), "planned.yaml")))


def test_planner_conditions(tmp_path: Path, tiny_spec: Path) -> None:
    trials = planned(tmp_path, tiny_spec.read_text())
    by_key = {t.key: t for t in trials}
    a, b = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    base_a, base_b = by_key["given/s0/baseA/d0"], by_key["given/s0/baseB/d0"]
    for base, classes in ((base_a, a), (base_b, b)):
        assert (base.role, base.depth, base.freeze_depth, base.copy_depth, base.base_key) == (
            "base",
            0,
            0,
            0,
            None,
        )
        assert base.classes == classes and base.level == 0
    expected = {  # condition: (freeze_depth, copy_depth, base) for depth n
        "AnB": lambda n: (n, n, base_a.key),
        "AnB+": lambda n: (0, n, base_a.key),
        "BnB": lambda n: (n, n, base_b.key),
        "BnB+": lambda n: (0, n, base_b.key),
        "random": lambda n: (n, 0, None),
    }
    transfer = [t for t in trials if t.role == "transfer"]
    assert {(t.condition, t.depth) for t in transfer} == {(c, n) for c in CONDITIONS for n in (1, 3)}
    for t in transfer:
        assert (t.freeze_depth, t.copy_depth, t.base_key) == expected[t.condition](t.depth), t.key
        assert t.classes == b  # every transfer net trains on B
        assert t.level == (0 if t.condition == "random" else 1)
        assert t.bn_policy == "frozen"


def test_planner_graph_is_consistent(tmp_path: Path, tiny_spec: Path) -> None:
    trials = planned(
        tmp_path,
        tiny_spec.read_text(),
        {"transfer.split": {"random": True, "seeds": [4, 5]}, "seeds": [0, 1]},
    )
    keys = [t.key for t in trials]
    assert len(keys) == len(set(keys))
    position = {t.key: i for i, t in enumerate(trials)}
    for t in trials:
        if t.base_key is not None:
            base = trials[position[t.base_key]]
            assert base.role == "base" and base.level == 0
            assert position[t.base_key] < position[t.key]  # base nets come first
            assert (base.seed, base.split) == (t.seed, t.split)
            assert base.condition == ("baseA" if t.condition.startswith("A") else "baseB")
    names = {t.display_name("tiny") for t in trials}
    assert len(names) == len(trials)


@pytest.mark.parametrize(
    ("split", "seeds", "depths", "conditions"),
    [
        ({"A": [0, 1, 2, 3, 4], "B": [5, 6, 7, 8, 9]}, [0], [1, 3], list(CONDITIONS)),
        ({"A": [0, 1, 2], "B": [3, 4, 5]}, [0, 7, 9], [2], ["AnB", "BnB+"]),
        ({"random": True, "seeds": [0, 1, 2]}, [0, 1], [1, 2, 3], ["AnB+", "random"]),
        ({"random": True, "seeds": [5], "a_classes": 3}, [3], "all", ["AnB"]),
    ],
)
def test_planner_counts(
    tmp_path: Path,
    tiny_spec: Path,
    split: dict[str, Any],
    seeds: list[int],
    depths: Any,
    conditions: list[str],
) -> None:
    edits = {
        "transfer.split": split,
        "seeds": seeds,
        "transfer.depths": depths,
        "transfer.conditions": conditions,
    }
    trials = planned(tmp_path, tiny_spec.read_text(), edits)
    n_splits = len(split["seeds"]) if "random" in split else 1
    n_depths = 3 if depths == "all" else len(depths)
    assert len(trials) == n_splits * len(seeds) * (2 + n_depths * len(conditions))
    assert Counter(t.role for t in trials)["base"] == 2 * n_splits * len(seeds)


def test_planner_only_plans_the_bases_it_needs(tmp_path: Path, tiny_spec: Path) -> None:
    trials = planned(tmp_path, tiny_spec.read_text(), {"transfer.conditions": ["BnB", "BnB+", "random"]})
    assert [t.condition for t in trials if t.role == "base"] == ["baseB"]  # the target baseline stays
    assert len(trials) == 1 + 2 * 3


def test_planner_random_splits(tmp_path: Path, tiny_spec: Path) -> None:
    spec = {"transfer.split": {"random": True, "seeds": [0, 1], "a_classes": 4}}
    vspec = load_spec(write(tmp_path, edited(tiny_spec.read_text(), spec)))
    assert [s.id for s in vspec.splits] == ["random-0", "random-1"]
    for split in vspec.splits:
        assert len(split.a) == 4 and len(split.b) == 6
        assert sorted(split.a + split.b) == list(range(10))
    assert vspec.splits[0] != vspec.splits[1]
    again = load_spec(write(tmp_path, edited(tiny_spec.read_text(), spec), "again.yaml"))
    assert again.splits == vspec.splits  # deterministic by seed


def test_planner_single_study(tmp_path: Path, tiny_spec: Path) -> None:
    edits = {
        "study": "single",
        "transfer": DELETE,
        "single": {"freeze_depth": 2, "classes": [1, 2]},
        "seeds": [0, 1],
    }
    trials = planned(tmp_path, tiny_spec.read_text(), edits)
    assert [(t.key, t.freeze_depth, t.copy_depth, t.base_key, t.classes) for t in trials] == [
        ("all/s0/single/d2", 2, 0, None, (1, 2)),
        ("all/s1/single/d2", 2, 0, None, (1, 2)),
    ]
