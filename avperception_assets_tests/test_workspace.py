"""The workspace: every `AVP_*` variable read in one place, with its default, and the folder
layout of a data location (the one data folders made before it have)."""

import re
from pathlib import Path

import pytest

import avperception_assets
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.workspace import VARIABLES, Workspace, WorkspaceError, variables_markdown

PACKAGE = Path(avperception_assets.__file__).parent

# variable -> (text set in the environment, the field's value)
EXAMPLES = {
    "AVP_DATA_DIR": ("/srv/avp", "/srv/avp"),
    "AVP_LANCEDB_URI": ("s3://bucket/lancedb", "s3://bucket/lancedb"),
    "AVP_RAY_ADDRESS": ("head:6379", "head:6379"),
    "AVP_RAY_FALLBACK": ("local", "local"),
    "AVP_RAY_DASHBOARD": ("1", True),
    "AVP_EMBEDDING_MODEL": ("clip:/models/tiny", "clip:/models/tiny"),
    "AVP_DEAD_RUN_CHECK": ("off", False),
    "AVP_RETRAIN_MIN_NEW_ROWS": ("20", 20),
    "AVP_RETRAIN_MIN_GROWTH": ("0.5", 0.5),
    "AVP_SENSORS_DEFAULT_STATUS": ("stopped", "stopped"),
    "AVP_CACHE_DIR": ("/var/cache/avp", "/var/cache/avp"),
}


def test_defaults_keep_the_layout_of_existing_data_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workspace = Workspace.from_env({})
    data = tmp_path / "data"
    assert workspace.data_location == str(data) and workspace.path == data
    assert workspace.lancedb_uri == str(data / "lancedb")
    assert (workspace.landing_dir, workspace.checkpoints_dir, workspace.reports_dir, workspace.exports_dir) == (
        data / "landing", data / "checkpoints", data / "reports", data / "exports")
    assert workspace.checkpoints_dir_for("base") == data / "checkpoints" / "base"
    assert workspace.reports_dir_for("rider") == data / "reports" / "rider"
    assert (workspace.config_dir, workspace.dagster_home) == (data / "config", data / "dagster_home")
    assert (workspace.ray_address, workspace.ray_dashboard, workspace.embedding_model) == (None, False, "color_layout")
    assert workspace.ray_fallback == "fail"
    assert (workspace.dead_run_check, workspace.retrain_min_new_rows, workspace.retrain_min_growth) == (True, 100, 0.25)
    assert workspace.sensors_default_status == "running" and workspace.storage_options == {}
    assert workspace.working_root == data and workspace.location_of(data / "reports") == str(data / "reports")


def test_every_variable_sets_its_field():
    assert set(EXAMPLES) == {v.name for v in VARIABLES}
    workspace = Workspace.from_env({name: raw for name, (raw, _) in EXAMPLES.items()})
    for variable in VARIABLES:
        assert getattr(workspace, variable.field) == EXAMPLES[variable.name][1], variable.name


def test_lancedb_follows_the_data_location_unless_set_and_empty_means_unset():
    assert Workspace.from_env({"AVP_DATA_DIR": "/srv/avp"}).lancedb_uri == "/srv/avp/lancedb"
    assert Workspace.from_env({"AVP_DATA_DIR": "/srv/avp", "AVP_LANCEDB_URI": " "}).lancedb_uri == "/srv/avp/lancedb"
    assert Workspace.from_env({"AVP_RAY_ADDRESS": ""}).ray_address is None


@pytest.mark.parametrize(("raw", "on"), [("1", True), ("on", True), ("TRUE", True), ("yes", True),
                                         ("0", False), ("off", False), ("false", False), ("No", False)])
def test_flags_read_the_usual_words(raw, on):
    workspace = Workspace.from_env({"AVP_RAY_DASHBOARD": raw, "AVP_DEAD_RUN_CHECK": raw})
    assert workspace.ray_dashboard is on and workspace.dead_run_check is on


@pytest.mark.parametrize(("name", "raw"), [
    ("AVP_RAY_DASHBOARD", "maybe"), ("AVP_DEAD_RUN_CHECK", "disabled"), ("AVP_RETRAIN_MIN_NEW_ROWS", "ten"),
    ("AVP_RETRAIN_MIN_NEW_ROWS", "-1"), ("AVP_RETRAIN_MIN_NEW_ROWS", "2.5"), ("AVP_RETRAIN_MIN_GROWTH", "a quarter"),
    ("AVP_RETRAIN_MIN_GROWTH", "-0.1"), ("AVP_RETRAIN_MIN_GROWTH", "nan"), ("AVP_SENSORS_DEFAULT_STATUS", "paused"),
    ("AVP_RAY_ADDRESS", "ray://head:10001"), ("AVP_RAY_ADDRESS", "head"), ("AVP_RAY_FALLBACK", "start"),
])
def test_a_bad_value_is_a_clear_error_naming_the_variable(name, raw):
    with pytest.raises(WorkspaceError, match="^" + re.escape(f"{name}={raw!r}: expected ")):
        Workspace.from_env({name: raw})


def test_an_object_store_data_location_is_not_a_folder():
    workspace = Workspace(data_location="s3://bucket/avp/")
    assert workspace.lancedb_uri == "s3://bucket/avp/lancedb"
    with pytest.raises(WorkspaceError, match="s3://bucket/avp/ is not a local folder"):
        workspace.landing_dir
    assert workspace.is_object_store
    assert (workspace.landing, workspace.location("checkpoints")) == ("s3://bucket/avp/landing", "s3://bucket/avp/checkpoints")


def test_an_object_store_writes_its_artifacts_to_a_working_copy_in_the_cache(tmp_path):
    workspace = Workspace(data_location="s3://bucket/avp/", cache_dir=str(tmp_path / "cache"))
    root = tmp_path / "cache" / "bucket" / "avp"
    assert (workspace.checkpoints_dir_for("rider"), workspace.reports_dir, workspace.exports_dir) == (
        root / "checkpoints" / "rider", root / "reports", root / "exports")
    best = workspace.checkpoints_dir_for("rider") / "7" / "best.pt"
    assert workspace.location_of(best) == "s3://bucket/avp/checkpoints/rider/7/best.pt"
    assert workspace.working_copy("s3://bucket/avp/checkpoints/rider/7/best.pt") == best
    assert workspace.working_copy(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    with pytest.raises(WorkspaceError, match="not under the data location"):
        workspace.working_copy("s3://bucket/other/checkpoints")
    with pytest.raises(WorkspaceError, match="not in the working copy"):
        workspace.location_of(tmp_path / "elsewhere")
    assert Workspace(data_location="s3://bucket/avp").cache_dir == str(Path("~/.cache/avperception").expanduser())


def test_a_local_data_location_names_the_same_places_as_folders(tmp_path):
    workspace = Workspace(data_location=str(tmp_path))
    assert not workspace.is_object_store
    assert (workspace.landing, workspace.location("reports")) == (str(workspace.landing_dir), str(workspace.reports_dir))


def test_the_configuration_table_lists_every_variable_with_its_default():
    table = variables_markdown().splitlines()
    assert table[0] == "| variable | default | meaning |" and len(table) == 2 + len(VARIABLES)
    for row, variable in zip(table[2:], VARIABLES):
        assert row.startswith(f"| `{variable.name}` | {variable.default} | ")


def test_the_resource_defaults_from_the_environment_and_lancedb_follows_its_data_location(tmp_path, monkeypatch):
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("AVP_RETRAIN_MIN_GROWTH", "0.5")
    monkeypatch.delenv("AVP_LANCEDB_URI", raising=False)
    resource = WorkspaceResource()
    assert resource.data_location == str(tmp_path / "env") and resource.retrain_policy().min_growth == 0.5
    assert resource.layout.lancedb_uri == str(tmp_path / "env" / "lancedb")
    moved = WorkspaceResource(data_location=str(tmp_path / "given"))
    assert moved.layout.lancedb_uri == str(tmp_path / "given" / "lancedb")
    monkeypatch.setenv("AVP_LANCEDB_URI", str(tmp_path / "tables"))
    assert WorkspaceResource(data_location=str(tmp_path / "given")).layout.lancedb_uri == str(tmp_path / "tables")


def test_only_the_workspace_module_names_our_variables():
    """`grep -rln AVP_ avperception_assets` (compiled files aside): one module reads the environment."""
    naming = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*")
              if path.is_file() and "__pycache__" not in path.parts and b"AVP_" in path.read_bytes()}
    assert naming == {"workspace.py"}
