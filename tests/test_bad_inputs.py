"""The bad-input catalogue (issue 5, item 7), completing ``tests/test_spec.py``.

Every malformed input gives a clear error naming the field or file, exit status 1 through the CLI
(``validate`` and ``submit --db sqlite:///.../x.db``), and writes nothing: no store file (or, for
refusals that need the store open first, a store with no experiments) and no runs folder. No Ray
instance is started: the cluster checks run the driver's own function against a faked ``ray.nodes()``.

Catalogue (71 distinct malformed inputs across the two modules):

tests/test_spec.py (BAD_EDITS, BAD_FILES and single tests):
  1 input too small for the backbone     2 bad backbone option value       3 cuda device without a GPU
  4 unknown backbone                     5 unknown head                     6 unknown task
  7 unknown timm model                   8 depth deeper than the backbone   9 depth 0
 10 misspelt depths 'all'               11 wrong type (epochs: ten)        12 negative learning rate
 13 unknown top-level key               14 unknown nested key              15 unknown split key
 16 unknown backbone option             17 unknown task option             18 overlapping A/B classes
 19 class out of range                  20 duplicate random-split seeds    21 random split: all classes in A
 22 random split: one class in A        23 duplicate seeds                 24 missing transfer section
 25 negative cpu                        26 stage_lr_mult of wrong length   27 unknown condition
 28 huge bad value (shown short)        29 broken YAML                     30 duplicate YAML keys
 31 !!python/object/apply tag           32 empty file                      33 only comments
 34 binary file                         35 not UTF-8                       36 a list, not a mapping
 37 a scalar, not a mapping             38 alias bomb (billion laughs)     39 recursive mapping alias
 40 missing spec file                   41 spec path is a folder

this module:
 42 absurd cpu (100000)                 43 absurd gpu (1000)               44 negative seed
 45 seed >= 2**31                       46 negative random-split seed      47 single.freeze_depth too deep
 48 single.classes out of range         49 unknown study kind              50 bad experiment name
 51 unknown device                      52 negative max_failures           53 task option of wrong type
 54 file over 1 MB                      55 !!python/name tag               56 !!python/object/new tag
 57 recursive sequence alias            58 cpu beyond the largest Ray node 59 gpu on a CPU-only cluster
 60 unknown database driver             61 unreachable PostgreSQL (password never shown)
 62 SQLite file in a missing folder     63 malformed database URL (password never shown)
 64 image_folder without root           65 image_folder root missing       66 image_folder root is a file
 67 corrupt (truncated) image           68 zero-byte image                 69 text file named .jpg
 70 non-image file in a class folder    71 class with too few images

Plus the ``!!python/object/apply:os.system`` payload through ``submit``, shown not to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result

from tests.conftest import TINY_TRANSFER
from tests.test_folders import make_folder, truncate
from tests.test_spec import DELETE, assert_refused, edited, files_in, invoke, write
from transferlab.service import driver
from transferlab.service.spec import load_spec
from transferlab.service.store import Store

COMMANDS = ("validate", "submit")


def run(command: str, spec: Path, folder: Path) -> Result:
    """``validate SPEC`` or ``submit SPEC --db sqlite:///FOLDER/x.db``."""
    if command == "validate":
        return invoke("validate", str(spec))
    return invoke("submit", str(spec), "--db", f"sqlite:///{folder}/x.db")


def assert_submit_refused(result: Result, fragments: list[str]) -> None:
    """As ``assert_refused``, for refusals after ``submit`` has set up its progress display, which
    prints one blank line before the error (``ProgressPrinter.stop`` of a display never started)."""
    assert result.exit_code == 1, result.output
    assert result.output.lstrip().startswith("Error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output


def experiments_in(url: str) -> list[Any]:
    store = Store.open(url, create=False)
    try:
        return store.experiments()
    finally:
        store.close()


# -- spec values --------------------------------------------------------------------------------------
BAD_VALUES = [
    pytest.param(
        {"resources.cpu": 100_000},
        ["resources.cpu: Input should be less than or equal to 1024 (got 100000)"],
        id="absurd-cpu",
    ),
    pytest.param(
        {"resources.gpu": 1000},
        ["resources.gpu: Input should be less than or equal to 64 (got 1000)"],
        id="absurd-gpu",
    ),
    pytest.param(
        {"seeds": [0, -1]},
        ["seeds.1: Input should be greater than or equal to 0 (got -1)"],
        id="negative-seed",
    ),
    pytest.param(
        {"seeds": [2**31]},
        ["seeds.0: Input should be less than 2147483648 (got 2147483648)"],
        id="seed-too-large",
    ),
    pytest.param(
        {"transfer.split": {"random": True, "seeds": [-5]}},
        ["transfer.split.seeds.0: Input should be greater than or equal to 0 (got -5)"],
        id="negative-split-seed",
    ),
    pytest.param(
        {"study": "single", "transfer": DELETE, "single": {"freeze_depth": 9}},
        ["single.freeze_depth: depth 9 is deeper than backbone 'convnet' (3 stages: conv1, conv2, conv3)"],
        id="single-freeze-depth-too-deep",
    ),
    pytest.param(
        {"study": "single", "transfer": DELETE, "single": {"classes": [1, 12]}},
        ["single.classes: classes [12] do not exist; the task has classes 0..9"],
        id="single-classes-out-of-range",
    ),
    pytest.param(
        {"study": "multitasking"},
        ["study: Input should be 'transfer', 'single' or 'multitask' (got 'multitasking')"],
        id="bad-study",
    ),
    pytest.param(
        {"name": "my study!"}, ["name: String should match pattern", "(got 'my study!')"], id="bad-name"
    ),
    pytest.param(
        {"train.device": "tpu"}, ["train.device: String should match pattern", "(got 'tpu')"], id="bad-device"
    ),
    pytest.param(
        {"max_failures": -1},
        ["max_failures: Input should be greater than or equal to 0 (got -1)"],
        id="negative-max-failures",
    ),
    pytest.param(
        {"task.image_size": "big"},
        ["task: digits: image_size must be an integer >= 8, got 'big'"],
        id="task-option-wrong-type",
    ),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("edits", "fragments"), BAD_VALUES)
def test_bad_values_are_refused(
    workdir: Path, tiny_spec: Path, command: str, edits: dict[str, Any], fragments: list[str]
) -> None:
    spec = write(workdir, edited(tiny_spec.read_text(), edits))
    before = files_in(workdir)
    result = run(command, spec, workdir)
    assert_refused(result, [f"{spec}: ", *fragments])
    assert files_in(workdir) == before  # no store, no runs folder


# -- files ------------------------------------------------------------------------------------------
BAD_FILES = [
    pytest.param(
        "name: tiny\n" + "#" * 1_100_000 + "\n",
        ["spec.yaml: file is 1100012 bytes; a spec must be under 1000000 bytes"],
        id="huge-file",
    ),
    pytest.param(
        "name: tiny\nbackbone: !!python/name:os.system\n",
        ["invalid YAML", "tag:yaml.org,2002:python/name:os.system"],
        id="python-name-tag",
    ),
    pytest.param(
        "name: tiny\nbackbone: !!python/object/new:os.system [echo pwned]\n",
        ["invalid YAML", "tag:yaml.org,2002:python/object/new:os.system"],
        id="python-object-new-tag",
    ),
    pytest.param(
        "name: tiny\nseeds: &loop [0, *loop]\n",
        ["invalid YAML: recursive alias *loop inside its own anchor"],
        id="recursive-sequence-alias",
    ),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("content", "fragments"), BAD_FILES)
def test_bad_files_are_refused(workdir: Path, command: str, content: str, fragments: list[str]) -> None:
    spec = write(workdir, content)
    result = run(command, spec, workdir)
    assert_refused(result, fragments)
    assert len(result.output) < 2_000
    assert files_in(workdir) == {"spec.yaml"}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_python_payload_is_not_run(workdir: Path, command: str) -> None:
    marker = workdir / "pwned"
    spec = write(workdir, f"name: tiny\nbackbone: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run(command, spec, workdir)
    assert_refused(result, ["invalid YAML", "python/object/apply:os.system"])
    assert not marker.exists()
    assert files_in(workdir) == {"spec.yaml"}


# -- resources the Ray cluster cannot give ----------------------------------------------------------
CLUSTER = [
    {"Alive": True, "Resources": {"CPU": 2.0, "memory": 8e9}},
    {"Alive": False, "Resources": {"CPU": 1024.0, "GPU": 8.0}},  # a dead node counts for nothing
]


@pytest.fixture
def small_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'Ray cluster' of one live 2-CPU node; nothing is started."""
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: CLUSTER)
    monkeypatch.setattr(driver, "ensure_ray", lambda address=None: None)


@pytest.mark.parametrize(
    ("resources", "fragment"),
    [
        (
            {"cpu": 512},
            "resources.cpu: each trial asks for 512 CPUs; the largest node of the Ray cluster has 2",
        ),
        ({"gpu": 1}, "resources.gpu: each trial asks for 1 GPUs; the largest node of the Ray cluster has 0"),
    ],
    ids=["cpu-beyond-largest-node", "gpu-on-cpu-only-cluster"],
)
def test_resources_beyond_the_cluster_are_refused_before_anything_runs(
    workdir: Path, tiny_spec: Path, small_cluster: None, resources: dict[str, float], fragment: str
) -> None:
    spec = write(workdir, edited(tiny_spec.read_text(), {"resources": resources}))
    with pytest.raises(driver.DriverError, match=fragment):
        driver.check_resources(load_spec(spec))
    url = f"sqlite:///{workdir}/x.db"
    result = invoke("submit", str(spec), "--db", url)
    assert_submit_refused(result, [fragment])
    assert experiments_in(url) == []  # the store was opened, but nothing was recorded
    assert not (workdir / driver.DEFAULT_RUNS_DIR).exists()


def test_resources_the_cluster_has_pass(tiny_spec: Path, small_cluster: None) -> None:
    driver.check_resources(load_spec(tiny_spec))  # cpu: 1 on a 2-CPU node


# -- store URLs ---------------------------------------------------------------------------------------
BAD_URLS = [
    pytest.param("nosuchdriver://x", ["cannot open nosuchdriver://x", "nosuchdriver"], id="unknown-driver"),
    pytest.param(
        "postgresql://u:pw-s3cret@127.0.0.1:1/x",
        ["postgresql+psycopg://u:***@127.0.0.1:1/x", "connection failed", "refused"],
        id="unreachable-postgres",
    ),
    pytest.param(
        "sqlite:///{folder}/missing/x.db",
        ["cannot create a store at sqlite:///{folder}/missing/x.db: folder {folder}/missing does not exist"],
        id="sqlite-in-missing-folder",
    ),
    pytest.param(
        "postgresql://u:pw-s3cret@host:notaport/x",
        ["malformed database URL postgresql://u:***@host:notaport/x"],
        id="malformed-url",
    ),
]


@pytest.mark.parametrize("via_env", [False, True], ids=["--db", "TRANSFERLAB_DB"])
@pytest.mark.parametrize(("url", "fragments"), BAD_URLS)
def test_bad_database_urls_are_refused_without_showing_the_password(
    workdir: Path,
    tiny_spec: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    fragments: list[str],
    via_env: bool,
) -> None:
    spec = write(workdir, tiny_spec.read_text())
    url = url.format(folder=workdir)
    before = files_in(workdir)
    if via_env:
        monkeypatch.setenv("TRANSFERLAB_DB", url)
        result = invoke("submit", str(spec))
    else:
        result = invoke("submit", str(spec), "--db", url)
    assert_submit_refused(result, [f.format(folder=workdir) for f in fragments])
    assert "s3cret" not in result.output
    assert files_in(workdir) == before


# -- image folders ------------------------------------------------------------------------------------
def folder_spec(root: Any) -> str:
    data = yaml.safe_load(TINY_TRANSFER)
    data["task"] = {"name": "image_folder", "image_size": 16}
    if root is not None:
        data["task"]["root"] = str(root)
    data["transfer"]["split"] = {"A": [0, 1], "B": [2, 3]}
    return yaml.safe_dump(data, sort_keys=False)


BAD_FOLDERS = [
    pytest.param(lambda d: None, None, ["task: image_folder: root is required"], id="root-not-given"),
    pytest.param(
        lambda d: None,
        "{data}/nowhere",
        ["task: image_folder: root folder '{data}/nowhere' does not exist"],
        id="root-missing",
    ),
    pytest.param(
        lambda d: None,
        "{data}/ant/ant_00.png",
        ["task: image_folder: root '{data}/ant/ant_00.png' is a file, not a folder"],
        id="root-is-a-file",
    ),
    pytest.param(
        lambda d: truncate(d / "bee" / "bee_04.png"),
        "{data}",
        ["1 image file(s) cannot be used", "{data}/bee/bee_04.png: corrupt or truncated image"],
        id="corrupt-image",
    ),
    pytest.param(
        lambda d: (d / "cat" / "cat_00.png").write_bytes(b""),
        "{data}",
        ["{data}/cat/cat_00.png: empty file (0 bytes)"],
        id="zero-byte-image",
    ),
    pytest.param(
        lambda d: (d / "dog" / "photo.jpg").write_text("<html>not found</html>\n"),
        "{data}",
        ["{data}/dog/photo.jpg: not an image file"],
        id="text-file-with-image-extension",
    ),
    pytest.param(
        lambda d: (d / "dog" / "Thumbs.db").write_bytes(b"\x00" * 16),
        "{data}",
        ["file(s) are not images by their extension", "{data}/dog/Thumbs.db"],
        id="non-image-file",
    ),
    pytest.param(
        lambda d: [p.unlink() for p in sorted((d / "ant").iterdir())[2:]],
        "{data}",
        ["every class needs at least 3 images", "{data}/ant: 2 image(s)"],
        id="class-too-small",
    ),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("breakage", "root", "fragments"), BAD_FOLDERS)
def test_bad_image_folders_are_refused_naming_the_file(
    workdir: Path, command: str, breakage: Any, root: str | None, fragments: list[str]
) -> None:
    data = make_folder(workdir / "data")
    breakage(data)
    spec = write(workdir, folder_spec(root.format(data=data) if root else None))
    before = files_in(workdir)
    result = run(command, spec, workdir)
    assert_refused(result, [f"{spec}: ", *(f.format(data=data) for f in fragments)])
    assert files_in(workdir) == before


def test_a_good_image_folder_spec_validates(workdir: Path) -> None:
    spec = write(workdir, folder_spec(make_folder(workdir / "data")))
    result = invoke("validate", str(spec), "-O", "json")
    assert result.exit_code == 0, result.output
    assert '"trials": 12' in result.output
    assert files_in(workdir) == {"data", "spec.yaml"}


def test_the_catalogue_above_matches_the_tables() -> None:
    from tests import test_spec

    here = [p.id for table in (BAD_VALUES, BAD_FILES, BAD_URLS, BAD_FOLDERS) for p in table] + [
        "cpu-beyond-largest-node",
        "gpu-on-cpu-only-cluster",
    ]
    spec_cases = [p.id for p in test_spec.BAD_EDITS + test_spec.BAD_FILES] + ["missing-file", "a-folder"]
    assert len(set(here)) == len(here) == 30 and not set(here) & set(spec_cases)
    total = len(here) + len(spec_cases)
    assert total >= 25 and f"Catalogue ({total} distinct malformed inputs" in (__doc__ or "")
