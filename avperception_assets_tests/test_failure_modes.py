"""The failure-mode registry file: the shipped defaults, a user's file merged over them, and the
errors a user sees for a file that cannot be used (each names the file, the mode and the field)."""

from __future__ import annotations

import re

import pytest

from avperception_assets.failure_modes.registry import (RESERVED_NAMES, FailureMode, FailureModeError, Tiling,
                                                        default_failure_modes, load_registry)
from avperception_assets.workspace import BASE_CHECKPOINTS, BASE_LONG_CHECKPOINTS, BASE_REPORTS

RIDER_TABLE = '''
[modes.night_rider]
filter = "timeofday = 'night' AND has_rider = true"
classes = ["rider"]
'''


def _load(tmp_path, text: str) -> tuple[FailureMode, ...]:
    (tmp_path / "failure_modes.toml").write_text(text)
    return load_registry(tmp_path)


def _error(tmp_path, text: str) -> str:
    with pytest.raises(FailureModeError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'failure_modes.toml'}: "), message
    return message


def test_the_shipped_modes_are_the_platforms_three():
    rider, night, distant = default_failure_modes()
    assert rider == FailureMode("rider", "has_rider = true", ("rider", "bicycle", "motorcycle"),
                                "Cyclists and motorcyclists: a person on a two-wheeler.")
    assert night == FailureMode("nighttime_person", "timeofday = 'night' AND has_person = true", ("pedestrian",),
                                "Pedestrians in night frames.")
    assert distant == FailureMode(
        "distant_person", "has_person = true AND person_bbox_area_pct < 0.5", ("pedestrian",),
        "Frames whose largest pedestrian is small, i.e. far away.", min_input_size=448,
        tiling=Tiling(448, overlap=0.2, whole_frame=True, train_on_tiles=True), finetune_epochs=6)
    assert distant.train_crop == 448


def test_a_mode_may_not_take_the_base_detectors_folders_or_table(tmp_path):
    assert {BASE_CHECKPOINTS, BASE_LONG_CHECKPOINTS, BASE_REPORTS} <= RESERVED_NAMES
    message = _error(tmp_path, '[modes.base]\nfilter = "has_rider = true"\nclasses = ["rider"]\n')
    assert "failure mode 'base': the name is the base detector's own" in message


def test_without_a_users_file_the_shipped_modes_load(tmp_path):
    assert load_registry(tmp_path) == load_registry(tmp_path / "missing") == default_failure_modes()


def test_a_users_mode_is_added_after_the_defaults(tmp_path):
    modes = _load(tmp_path, RIDER_TABLE)
    assert [m.name for m in modes] == ["rider", "nighttime_person", "distant_person", "night_rider"]
    assert modes[-1].columns == ("timeofday", "has_rider") and modes[-1].classes == ("rider",)


def test_a_users_mode_replaces_the_default_of_its_name_entirely_in_its_place(tmp_path):
    modes = _load(tmp_path, '''
[modes.distant_person]
filter = "has_person = true AND person_bbox_area_pct < 2.0"
classes = ["pedestrian", "rider"]
''')
    assert [m.name for m in modes] == ["rider", "nighttime_person", "distant_person"]
    distant = modes[2]
    assert distant.where == "has_person = true AND person_bbox_area_pct < 2.0"
    assert distant.classes == ("pedestrian", "rider")
    # nothing is inherited from the default it replaces
    assert (distant.description, distant.min_input_size, distant.tiling, distant.finetune_epochs) == ("", None, None, None)


def test_every_setting_of_a_mode_is_a_field(tmp_path):
    [*_, mode] = _load(tmp_path, '''
[modes.tiny_things]
description = "Small boxes."
filter = "num_persons >= 1"
classes = ["pedestrian"]
min_input_size = 512
finetune_epochs = 7

[modes.tiny_things.tiling]
tile_size = 320
overlap = 0.25
whole_frame = false
''')
    assert mode.description == "Small boxes." and (mode.min_input_size, mode.finetune_epochs) == (512, 7)
    assert mode.tiling == Tiling(320, overlap=0.25, whole_frame=False, train_on_tiles=False)
    assert mode.train_crop is None


def test_a_mode_defined_by_example_needs_no_filter(tmp_path):
    [*_, mode] = _load(tmp_path, '''
[modes.like_these]
classes = ["rider"]
exemplars = ["frame-1", "frame-2"]
max_distance = 0.3
''')
    assert mode.exemplars == ("frame-1", "frame-2") and mode.where == "like_these_distance <= 0.3"


# The registry docs' example of a mode defined by track behaviour (default.toml's comment).
LOST_PEDESTRIANS = '''
[modes.lost_pedestrian]
description = "Pedestrians the base detector finds in under half of their track's frames."
classes = ["pedestrian"]
track_coverage_below = 0.5
'''


def test_a_mode_defined_by_track_coverage_needs_no_filter(tmp_path):
    [*_, lost] = _load(tmp_path, LOST_PEDESTRIANS)
    assert lost.where == "(min_track_coverage.pedestrian < 0.5)"
    assert lost.track_columns == lost.columns == ("min_track_coverage",)


def test_track_coverage_joins_the_filter_for_each_class(tmp_path):
    [*_, mode] = _load(tmp_path, '''
[modes.lost_at_night]
filter = "timeofday = 'night'"
classes = ["rider", "bicycle"]
track_coverage_below = 0.25
''')
    assert mode.where == ("(min_track_coverage.rider < 0.25 OR min_track_coverage.bicycle < 0.25) "
                          "AND (timeofday = 'night')")
    assert set(mode.columns) == {"timeofday", "min_track_coverage"} and mode.curation_columns == ()


def test_a_filter_may_read_the_coverage_columns_itself(tmp_path):
    [*_, mode] = _load(tmp_path, '''
[modes.any_lost_box]
filter = "array_min(ann_track_coverage) < 0.2"
classes = ["car"]
''')
    assert mode.track_columns == ("ann_track_coverage",)


@pytest.mark.parametrize("table, says", [
    (LOST_PEDESTRIANS.replace("0.5", "0"), "'lost_pedestrian', field 'track_coverage_below': must be a share of "
                                           "a track's frames in \\(0, 1\\], got 0"),
    (LOST_PEDESTRIANS.replace("0.5", "1.5"), "'lost_pedestrian', field 'track_coverage_below': must be a share"),
    (LOST_PEDESTRIANS.replace("0.5", "'half'"), "'lost_pedestrian', field 'track_coverage_below': must be a number"),
    (LOST_PEDESTRIANS.replace("0.5", "true"), "'lost_pedestrian', field 'track_coverage_below': must be a number"),
    (LOST_PEDESTRIANS.replace('["pedestrian"]', '["pedestrian", "traffic light"]'),
     "'lost_pedestrian', field 'track_coverage_below': needs classes that BDD100K MOT tracks .*"
     "\\['traffic light'\\] have no tracks"),
    (LOST_PEDESTRIANS.replace('classes = ["pedestrian"]', ""),
     "'lost_pedestrian', field 'classes': missing required field"),
    (LOST_PEDESTRIANS + "filter = \"min_track_coverage.pedestrain < 0.5\"\n",
     "'lost_pedestrian', field 'filter': invalid filter .*pedestrain not found"),
])
def test_a_bad_track_coverage_mode_is_an_error_naming_the_field(tmp_path, table, says):
    message = _error(tmp_path, table)
    assert re.search(f"failure mode {says}", message), message


@pytest.mark.parametrize("table, says", [
    (RIDER_TABLE + 'clases = ["rider"]\n', "'night_rider', field 'clases': unknown field"),
    (RIDER_TABLE + "min_input_size = '448'\n", "'night_rider', field 'min_input_size': must be an integer"),
    (RIDER_TABLE + "finetune_epochs = 2.5\n", "'night_rider', field 'finetune_epochs': must be an integer"),
    (RIDER_TABLE + "finetune_epochs = 0\n", "'night_rider', field 'finetune_epochs': must be a positive integer"),
    (RIDER_TABLE.replace('["rider"]', '"rider"'), "'night_rider', field 'classes': must be a list"),
    (RIDER_TABLE.replace('["rider"]', '["rider", "unicycle"]'),
     "'night_rider', field 'classes': must be det_20 names .* \\(unknown: \\['unicycle'\\]\\)"),
    (RIDER_TABLE.replace("has_rider = true", "has_ridr = true"),
     "'night_rider', field 'filter': invalid filter .*No field named has_ridr"),
    (RIDER_TABLE.replace("has_rider = true", "has_rider = true; DROP TABLE bdd100k"),
     "'night_rider', field 'filter': .*one expression only"),
    (RIDER_TABLE.replace("night_rider", "Night-Rider"), "'Night-Rider': the name must be lower-case letters"),
    (RIDER_TABLE.replace('classes = ["rider"]', ""), "'night_rider', field 'classes': missing required field"),
    (RIDER_TABLE.replace("filter = ", "description = "), "'night_rider', field 'filter': missing required field"),
    (RIDER_TABLE + 'exemplars = ["frame-1"]\n', "'night_rider', field 'max_distance': missing required field"),
    (RIDER_TABLE + "[modes.night_rider.tiling]\noverlap = 0.2\n",
     "'night_rider', field 'tiling.tile_size': missing required field"),
    (RIDER_TABLE + "[modes.night_rider.tiling]\ntile_size = 448\nstride = 2\n",
     "'night_rider', field 'tiling.stride': unknown field"),
    (RIDER_TABLE + "[modes.night_rider.tiling]\ntile_size = 448\nwhole_frame = 'yes'\n",
     "'night_rider', field 'tiling.whole_frame': must be true or false"),
    (RIDER_TABLE + "[modes.night_rider.tiling]\ntile_size = 448\noverlap = 1.5\n",
     "'night_rider', field 'tiling': overlap must be a fraction of a tile"),
    (RIDER_TABLE + "tiling = 448\n", "'night_rider', field 'tiling': must be a table"),
])
def test_a_bad_field_is_an_error_naming_the_mode_and_the_field(tmp_path, table, says):
    message = _error(tmp_path, table)
    assert re.search(f"failure mode {says}", message), message


def test_a_syntax_error_names_the_file_and_the_line(tmp_path):
    message = _error(tmp_path, RIDER_TABLE.replace('"timeofday = \'night\' AND has_rider = true"', "has_rider"))
    assert "TOML syntax error" in message and "(at line 3, column 10)" in message


def test_the_file_holds_modes_tables_only(tmp_path):
    assert "unknown top-level key 'rider'" in _error(tmp_path, '[rider]\nfilter = "has_rider = true"\n')
    assert "'modes' must be tables" in _error(tmp_path, 'modes = ["rider"]\n')
    assert "failure mode 'rider' must be a table ([modes.rider])" in _error(tmp_path, '[modes]\nrider = "has_rider"\n')
