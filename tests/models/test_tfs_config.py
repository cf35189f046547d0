"""TF Serving model config files, parsed with TF Serving's own ModelServerConfig proto."""
from __future__ import annotations

import json
import os

import pytest

from sgserve.models.tfs_config import (ModelConfig, ModelConfigError, VersionPolicy, load_model_server_config,
                                parse_model_server_config, parse_version_policy)

# Written the way the TF Serving docs (serving_config.md) write them: single quotes, comments, map
# entries as key/value blocks, the deprecated model_type on one model.
TFSERVING_CONFIG = """\
# Two models, as tensorflow_model_server --model_config_file=... would take them.
model_config_list {
  config {
    name: 'ranker'
    base_path: '/models/ranker'
    model_platform: 'tensorflow'
    model_version_policy {
      specific {
        versions: 42
        versions: 43
      }
    }
    version_labels {
      key: 'stable'
      value: 42
    }
    version_labels {
      key: 'canary'
      value: 43
    }
  }
  config {
    name: "retrieval"
    base_path: "/models/retrieval/"
    model_type: TENSORFLOW
    model_version_policy: { latest: { num_versions: 2 } }
  }
}
"""


def test_tfserving_config_two_models():
    models = parse_model_server_config(TFSERVING_CONFIG, source="models.config")
    assert [m.name for m in models] == ["ranker", "retrieval"]
    ranker, retrieval = models
    assert ranker == ModelConfig(name="ranker", base_path="/models/ranker", platform="tensorflow",
                                 version_policy=VersionPolicy("specific", versions=(42, 43)),
                                 version_labels={"stable": 42, "canary": 43})
    assert retrieval.base_path == "/models/retrieval"
    assert retrieval.platform == "tensorflow"
    assert retrieval.version_policy == VersionPolicy("latest", num_versions=2)
    assert retrieval.version_labels == {}
    assert ranker.version_policy.describe() == "specific 42,43"
    assert retrieval.version_policy.describe() == "latest 2"


@pytest.mark.parametrize("policy, expected", [
    ("", VersionPolicy("latest", 1)),  # no model_version_policy: TF Serving serves the latest one
    ("model_version_policy {}", VersionPolicy("latest", 1)),
    ("model_version_policy { latest {} }", VersionPolicy("latest", 1)),
    ("model_version_policy { latest { num_versions: 0 } }", VersionPolicy("latest", 1)),  # max(n, 1)
    ("model_version_policy { latest { num_versions: 3 } }", VersionPolicy("latest", 3)),
    ("model_version_policy { all {} }", VersionPolicy("all")),
    ("model_version_policy { specific { versions: 3 versions: 1 versions: 3 } }",
     VersionPolicy("specific", versions=(1, 3))),
    ("model_version_policy { specific { versions: 0 } }", VersionPolicy("specific", versions=(0,))),
])
def test_each_policy_kind(policy, expected):
    text = f"model_config_list {{ config {{ name: 'm' base_path: '/m' model_platform: 'tensorflow' {policy} }} }}"
    (model,) = parse_model_server_config(text)
    assert model.version_policy == expected


def test_empty_configs_serve_nothing():
    assert parse_model_server_config("") == []
    assert parse_model_server_config("# nothing yet\n") == []
    assert parse_model_server_config("model_config_list {}") == []


def test_platform_may_be_left_empty():
    (model,) = parse_model_server_config("model_config_list { config { name: 'm' base_path: '/m' } }")
    assert model.platform == "tensorflow"


def test_relative_base_path_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (model,) = parse_model_server_config("model_config_list { config { name: 'm' base_path: 'models/m' } }")
    assert model.base_path == os.path.join(str(tmp_path), "models", "m")
    (model,) = parse_model_server_config("model_config_list { config { name: 'm' base_path: 'file:///srv/m' } }")
    assert model.base_path == "/srv/m"


def test_load_reads_the_file(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(TFSERVING_CONFIG)
    assert [m.name for m in load_model_server_config(str(path))] == ["ranker", "retrieval"]


def test_load_missing_file(tmp_path):
    missing = str(tmp_path / "nope.config")
    with pytest.raises(ModelConfigError, match=r"cannot read model config file .*nope\.config: No such file"):
        load_model_server_config(missing)


def _config(body: str) -> str:
    return f"model_config_list {{\n  config {{\n{body}\n  }}\n}}\n"


@pytest.mark.parametrize("text, expected", [
    # Syntax errors carry source:line:column from protobuf's parser.
    (_config("    name: 'm'\n    base_pat: '/m'"),
     ['models.config:4:', 'no field named "base_pat"', "valid fields there: name, base_path,"]),
    ("model_config_list {\n  config { name: 'm' base_path: '/m' }\n",
     ["models.config:2:", 'Expected "}"', "ModelServerConfig in protobuf text format"]),
    (_config("    name: 'm'\n    name: 'n'"), ["models.config:4:", 'multiple "name" fields']),
    (_config("    name: 'm'\n    base_path: '/m'\n    model_version_policy { latest { num_versions: -1 } }"),
     ["models.config:5:", "out of range"]),
    (_config("    name: 'm'\n    base_path: '/m'\n    model_version_policy { latest {} specific { versions: 1 } }"),
     ["models.config:5:", "oneof"]),
    # Semantics.
    ("custom_model_config { type_url: 'type.googleapis.com/my.Config' }",
     ["custom_model_config is not supported", "model_config_list"]),
    ("custom_model_config { [type.googleapis.com/my.Config] { } }", ["custom_model_config is not supported"]),
    (_config("    base_path: '/m'"), ["entry #1 has no name", 'name: "..."']),
    (_config("    name: 'm'"), ["models.config:3: model 'm' has no base_path", "base_path:"]),
    (_config("    name: 'm'\n    base_path: '/m'\n    model_platform: 'tensorflow_lite'"),
     ["model 'm'", 'model_platform "tensorflow_lite" is not supported', 'model_platform: "tensorflow"']),
    (_config("    name: 'm'\n    base_path: '/m'\n    model_type: OTHER"), ["model_type OTHER is not supported"]),
    (_config("    name: 'm'\n    base_path: 'gs://bucket/m'"), ["gs://bucket/m is a remote URI", "local"]),
    (_config("    name: 'm'\n    base_path: '/m'\n    model_version_policy { specific {} }"),
     ["model 'm'", "specific { } lists no versions", "versions: N"]),
    (_config("    name: 'm'\n    base_path: '/m'\n    model_version_policy { specific { versions: 2 versions: -1 } }"),
     ["model 'm'", "negative version(s) -1"]),
    (_config("    name: 'm'\n    base_path: '/m'\n    version_labels { key: 'stable' value: -3 }"),
     ["version label 'stable' points at version -3", "non-negative"]),
    (_config("    name: 'm'\n    base_path: '/m'\n    version_labels { key: '' value: 1 }"), ["empty key"]),
    ("model_config_list {\n  config { name: 'a' base_path: '/a' }\n  config { name: 'b' base_path: '/b' }\n"
     "  config { name: 'a' base_path: '/a2' }\n}\n",
     ["models.config:4:", "Illegal to list model a multiple times", "#1 and #3", "unique name"]),
])
def test_errors_say_where_and_what_to_change(text, expected):
    with pytest.raises(ModelConfigError) as info:
        parse_model_server_config(text, source="models.config")
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_select_follows_tfserving():
    on_disk = [3, 1, 10, 2]
    assert VersionPolicy().select(on_disk) == [10]
    assert VersionPolicy("latest", 2).select(on_disk) == [3, 10]
    assert VersionPolicy("latest", 9).select(on_disk) == [1, 2, 3, 10]
    assert VersionPolicy("all").select(on_disk) == [1, 2, 3, 10]
    specific = VersionPolicy("specific", versions=(2, 10, 7))
    assert specific.select(on_disk) == [2, 10]  # 7 is not on disk: served without it, as TF Serving does
    assert specific.missing(on_disk) == [7]
    assert VersionPolicy("latest", 2).select([]) == []
    assert specific.select([]) == []


def test_check_labels_needs_served_versions():
    model = ModelConfig("m", "/m", version_policy=VersionPolicy("latest", 2), version_labels={"stable": 3})
    model.check_labels([3, 4])
    with pytest.raises(ModelConfigError, match=r"label 'stable' to version 3 of model m, which is not currently "
                                               r"available for inference \(served versions: 4, 5\)"):
        model.check_labels([4, 5])


def test_label_on_a_version_the_specific_policy_never_serves():
    text = _config("    name: 'm'\n    base_path: '/m'\n    model_version_policy { specific { versions: 1 } }\n"
                   "    version_labels { key: 'stable' value: 2 }")
    (model,) = parse_model_server_config(text, source="models.config")  # parses: the check needs the flag
    assert model.version_labels == {"stable": 2}
    with pytest.raises(ModelConfigError, match=r"label 'stable' points at version 2, which the specific version "
                                               r"policy \(1\) never serves; add 2 to"):
        model.check_labels([1])
    model.check_labels([1], current={}, allow_unavailable=True)  # a new label may point there (TF Serving)


def test_allow_version_labels_for_unavailable_models_follows_server_core():
    """server_core.cc UpdateModelVersionLabelMap: with the flag, a NEW label, or one kept on its
    version, may point at an unavailable version; moving an existing label onto one may not."""
    model = ModelConfig("m", "/m", version_labels={"stable": 1, "canary": 3, "kept": 7})
    current = {"stable": 1, "canary": 2, "kept": 7}
    assert model.labels_to_check(current, allow_unavailable=False) == {"stable": 1, "canary": 3, "kept": 7}
    assert model.labels_to_check(current, allow_unavailable=True) == {"canary": 3}  # moved: 2 -> 3
    assert model.labels_to_check({}, allow_unavailable=True) == {}  # all new
    model.check_labels([1, 3], current=current, allow_unavailable=True)
    with pytest.raises(ModelConfigError, match=r"label 'canary' to version 3 of model m, which is not currently "
                                               r"available for inference \(served versions: 1, 2\)"):
        model.check_labels([1, 2], current=current, allow_unavailable=True)
    with pytest.raises(ModelConfigError, match=r"label 'canary' to version 3"):
        model.check_labels([1, 2], current={"stable": 1, "canary": 3, "kept": 7})  # flag off: every label


def test_describe():
    assert VersionPolicy().describe() == "latest 1"
    assert VersionPolicy("latest", 3).describe() == "latest 3"
    assert VersionPolicy("all").describe() == "all"
    assert VersionPolicy("specific", versions=(3, 1)).describe() == "specific 1,3"


def test_round_trip_through_json():
    for model in parse_model_server_config(TFSERVING_CONFIG):
        wire = json.loads(json.dumps(model.to_dict()))
        assert ModelConfig.from_dict(wire) == model
    model = ModelConfig("m", "/m", version_policy=VersionPolicy("all"))
    assert ModelConfig.from_dict(json.loads(json.dumps(model.to_dict()))) == model


@pytest.mark.parametrize("spec, expected", [
    ("latest", VersionPolicy("latest", 1)),
    ("latest:3", VersionPolicy("latest", 3)),
    (" all ", VersionPolicy("all")),
    ("specific:1,3", VersionPolicy("specific", versions=(1, 3))),
    ("specific: 3, 1", VersionPolicy("specific", versions=(1, 3))),
])
def test_parse_version_policy(spec, expected):
    assert parse_version_policy(spec) == expected


@pytest.mark.parametrize("spec, expected", [
    ("newest", "not understood; use latest, latest:N, all or specific:V1,V2"),
    ("latest:0", "positive integer"),
    ("latest:x", "positive integer"),
    ("specific", "not understood"),
    ("specific:", "comma-separated list"),
    ("specific:1,,3", "comma-separated list"),
    ("specific:-1", "non-negative"),
    ("all:2", "not understood"),
])
def test_parse_version_policy_errors(spec, expected):
    with pytest.raises(ModelConfigError, match=expected):
        parse_version_policy(spec)


def test_policy_validates_itself():
    with pytest.raises(ModelConfigError, match="one of latest, all, specific"):
        VersionPolicy("newest")
    with pytest.raises(ModelConfigError, match="positive integer"):
        VersionPolicy("latest", 0)
    with pytest.raises(ModelConfigError, match="at least one version"):
        VersionPolicy("specific")
