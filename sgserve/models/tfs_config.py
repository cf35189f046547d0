"""TF Serving's ``--model_config_file``: a ModelServerConfig in protobuf text format.

Parsed with TF Serving's own proto, so a file that tensorflow_model_server accepts works here
unchanged. The rules mirror tensorflow_serving (model_servers/server_core.cc and
sources/storage_path/file_system_storage_path_source.cc):

- no ``model_version_policy`` (or an empty one) means ``latest`` with one version, and
  ``latest { num_versions: 0 }`` also serves one version;
- ``specific`` serves the listed versions that exist on disk (a listed version that is missing is a
  warning there, not an error); ``all`` serves every integer-named directory;
- a model name may appear once; ``custom_model_config`` is not something sgserve can load;
- a version label may only point at a version that is being served; with
  ``--allow_version_labels_for_unavailable_models`` a NEW label may point at any version (one that
  is not loaded yet, or that the policy does not serve), but moving an existing label still needs
  an available version (server_core.cc, UpdateModelVersionLabelMap); see ModelConfig.labels_to_check.

sgserve is more lenient in two places, so that nothing TF Serving accepts is refused: an empty
``model_platform`` means "tensorflow", and a relative ``base_path`` is taken relative to the current
directory (TF Serving refuses it unless it was given a root directory).

The protobuf modules are imported inside the functions that need them: the rest of this module (the
dataclasses, parse_version_policy) works where tensorflow-serving-api is not installed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Iterable

from sgserve.errors import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"
ALL = "all"
SPECIFIC = "specific"
POLICY_KINDS = (LATEST, ALL, SPECIFIC)
TENSORFLOW_PLATFORM = "tensorflow"

_FILE_HINT = ("(expected a ModelServerConfig in protobuf text format, the --model_config_file of "
              "tensorflow_model_server)")


class ModelConfigError(ConfigError):
    """A model config file or version policy that sgserve cannot serve; the message says what to change."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which version directories of a model to serve (TF Serving's ServableVersionPolicy)."""

    kind: str = LATEST  # latest | all | specific
    num_versions: int = 1  # for latest
    versions: tuple[int, ...] = ()  # for specific

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ModelConfigError(f"version policy must be one of {', '.join(POLICY_KINDS)}, got {self.kind!r}")
        if self.kind == LATEST and (not _is_int(self.num_versions) or self.num_versions < 1):
            raise ModelConfigError(f"latest: num_versions must be a positive integer, got {self.num_versions!r}")
        if self.kind == SPECIFIC and not self.versions:
            raise ModelConfigError("specific: list at least one version to serve")
        bad = [v for v in self.versions if not _is_int(v) or v < 0]
        if bad:
            raise ModelConfigError(f"specific: versions are the non-negative integers that name version "
                                   f"directories, got {', '.join(map(repr, bad))}")
        # Frozen: normalise through object.__setattr__ so that equal policies compare equal.
        object.__setattr__(self, "versions", tuple(sorted(set(self.versions))) if self.kind == SPECIFIC else ())
        if self.kind != LATEST:
            object.__setattr__(self, "num_versions", 1)

    def select(self, on_disk: Iterable[int]) -> list[int]:
        """The versions to serve out of those found on disk, ascending."""
        found = sorted(set(on_disk))
        if self.kind == LATEST:
            return found[-self.num_versions:]
        if self.kind == ALL:
            return found
        wanted = set(self.versions)
        return [v for v in found if v in wanted]

    def missing(self, on_disk: Iterable[int]) -> list[int]:
        """Specific versions that are not on disk (TF Serving logs a warning for each)."""
        return sorted(set(self.versions) - set(on_disk))

    def describe(self) -> str:
        if self.kind == LATEST:
            return f"latest {self.num_versions}"
        if self.kind == ALL:
            return "all"
        return "specific " + ",".join(map(str, self.versions))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_versions": self.num_versions, "versions": list(self.versions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VersionPolicy":
        return cls(kind=d.get("kind", LATEST), num_versions=d.get("num_versions", 1),
                   versions=tuple(d.get("versions", ())))


@dataclasses.dataclass
class ModelConfig:
    """One model of a model config file, validated and with an absolute base path."""

    name: str
    base_path: str
    platform: str = TENSORFLOW_PLATFORM
    version_policy: VersionPolicy = VersionPolicy()
    version_labels: dict[str, int] = dataclasses.field(default_factory=dict)

    def labels_to_check(self, current: dict[str, int] | None = None,
                        allow_unavailable: bool = False) -> dict[str, int]:
        """The labels that must point at an available version. All of them, as TF Serving requires; with
        ``allow_unavailable`` (--allow_version_labels_for_unavailable_models) only those that move a
        label of ``current`` (the labels now in force) onto another version."""
        if not allow_unavailable:
            return dict(self.version_labels)
        current = current or {}
        return {label: v for label, v in self.version_labels.items() if label in current and current[label] != v}

    def never_served(self, label: str, version: int) -> ModelConfigError | None:
        """The error for a label on a version that the specific version policy never serves, if it is one."""
        policy = self.version_policy
        if policy.kind != SPECIFIC or version in policy.versions:
            return None
        return ModelConfigError(
            f"model '{self.name}': version label '{label}' points at version {version}, which the specific version "
            f"policy ({','.join(map(str, policy.versions))}) never serves; add {version} to model_version_policy "
            f"{{ specific {{ versions: ... }} }} or point the label elsewhere")

    def check_labels(self, served: Iterable[int], current: dict[str, int] | None = None,
                     allow_unavailable: bool = False) -> None:
        """Raises unless every label that must (labels_to_check) points at a served version."""
        served = set(served)
        for label, version in sorted(self.labels_to_check(current, allow_unavailable).items()):
            never = self.never_served(label, version)
            if never is not None:
                raise never
            if version not in served:
                have = ", ".join(map(str, sorted(served))) or "none"
                raise ModelConfigError(
                    f"Request to assign label '{label}' to version {version} of model {self.name}, which is "
                    f"not currently available for inference (served versions: {have}); point the label at a "
                    f"served version or change the version policy ({self.version_policy.describe()})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_path": self.base_path, "platform": self.platform,
                "version_policy": self.version_policy.to_dict(), "version_labels": dict(self.version_labels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(name=d["name"], base_path=d["base_path"], platform=d.get("platform", TENSORFLOW_PLATFORM),
                   version_policy=VersionPolicy.from_dict(d.get("version_policy", {})),
                   version_labels={str(k): int(v) for k, v in d.get("version_labels", {}).items()})


def parse_version_policy(spec: str) -> VersionPolicy:
    """The command-line form: ``latest``, ``latest:N``, ``all`` or ``specific:V1,V2,...``."""
    usage = "use latest, latest:N, all or specific:V1,V2"
    kind, sep, arg = spec.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind == ALL and not sep:
        return VersionPolicy(ALL)
    if kind == LATEST:
        if not sep:
            return VersionPolicy(LATEST)
        if not arg.isdigit() or int(arg) < 1:
            raise ModelConfigError(f"version policy {spec!r}: N in latest:N must be a positive integer; {usage}")
        return VersionPolicy(LATEST, num_versions=int(arg))
    if kind == SPECIFIC and sep:
        parts = [p.strip() for p in arg.split(",")]
        if not arg or not all(p.isdigit() for p in parts):
            raise ModelConfigError(f"version policy {spec!r}: specific takes a comma-separated list of "
                                   f"non-negative version numbers, e.g. specific:1,3")
        return VersionPolicy(SPECIFIC, versions=tuple(int(p) for p in parts))
    raise ModelConfigError(f"version policy {spec!r} is not understood; {usage}")


def read_model_server_config(path: str) -> str:
    """The text of a model config file; a file that cannot be read is a ModelConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ModelConfigError(f"cannot read model config file {path}: {reason}") from None


def load_model_server_config(path: str) -> list[ModelConfig]:
    """Reads and parses a model config file; a file that cannot be read is a ModelConfigError."""
    return parse_model_server_config(read_model_server_config(path), source=path)


def parse_model_server_config(text: str, source: str = "<model config>") -> list[ModelConfig]:
    """The models of a ModelServerConfig text, in file order. An empty config serves nothing."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    proto = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise _syntax_error(exc, text, source, proto) from None
    which = proto.WhichOneof("config")
    if which == "custom_model_config":
        raise ModelConfigError(f"{source}: custom_model_config is not supported (tensorflow_model_server "
                               f"does not load it either); list the models in model_config_list {{ config {{ "
                               f"name: ... base_path: ... }} }}")
    models: list[ModelConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(proto.model_config_list.config, start=1):
        model = _model_config(entry, index, text, source, model_server_config_pb2)
        if model.name in seen:
            raise ModelConfigError(
                f"{_where(source, text, model.name, nth=2)}: Illegal to list model {model.name} multiple times "
                f"in config list (entries #{seen[model.name]} and #{index}); give each model a unique name")
        seen[model.name] = index
        models.append(model)
    return models


def _model_config(entry: Any, index: int, text: str, source: str, pb2: Any) -> ModelConfig:
    name = entry.name
    if not name:
        raise ModelConfigError(f"{source}: model config entry #{index} has no name; add name: \"...\" "
                               f"(the name clients use in requests)")
    where = _where(source, text, name)
    what = f"{where}: model '{name}'"

    platform = entry.model_platform
    if entry.model_type != pb2.ModelType.Value("MODEL_TYPE_UNSPECIFIED"):  # deprecated field
        if entry.model_type != pb2.ModelType.Value("TENSORFLOW"):
            raise ModelConfigError(f"{what}: model_type {pb2.ModelType.Name(entry.model_type)} is not supported; "
                                   f"use model_platform: \"tensorflow\"")
        platform = platform or TENSORFLOW_PLATFORM
    if platform not in ("", TENSORFLOW_PLATFORM):
        raise ModelConfigError(f"{what}: model_platform \"{platform}\" is not supported; sgserve serves "
                               f"TensorFlow SavedModels only (model_platform: \"tensorflow\")")

    if not entry.base_path:
        raise ModelConfigError(f"{what} has no base_path; add base_path: \"/path/to/{name}\" (the directory "
                               f"that holds the integer-named version directories)")
    base_path = _local_path(entry.base_path, what)

    if entry.HasField("logging_config"):
        log.warning("%s: logging_config is ignored (sgserve does not log requests)", what)

    try:
        policy = _version_policy(entry.model_version_policy)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{what}: model_version_policy {exc}") from None

    labels: dict[str, int] = {}
    for label, version in sorted(entry.version_labels.items()):
        if not label:
            raise ModelConfigError(f"{what}: a version label has an empty key; give it a name like \"stable\"")
        if version < 0:
            raise ModelConfigError(f"{what}: version label '{label}' points at version {version}; label values "
                                   f"are version numbers (non-negative integers)")
        labels[label] = int(version)  # whether it may point there is check_labels' question

    return ModelConfig(name=name, base_path=base_path, platform=TENSORFLOW_PLATFORM, version_policy=policy,
                       version_labels=labels)


def _version_policy(p: Any) -> VersionPolicy:
    choice = p.WhichOneof("policy_choice")
    if choice is None:
        return VersionPolicy(LATEST)
    if choice == "latest":
        # TF Serving: max(num_versions, 1), so an unset or zero num_versions serves one version.
        return VersionPolicy(LATEST, num_versions=max(p.latest.num_versions, 1))
    if choice == "all":
        return VersionPolicy(ALL)
    versions = list(p.specific.versions)
    if not versions:
        raise ModelConfigError("specific { } lists no versions, so nothing would be served; add "
                               "versions: N (one line per version) or use latest { } / all { }")
    negative = [v for v in versions if v < 0]
    if negative:
        raise ModelConfigError(f"specific lists negative version(s) {', '.join(map(str, negative))}; versions "
                               f"name integer directories under base_path (0, 1, 2, ...)")
    return VersionPolicy(SPECIFIC, versions=tuple(versions))


def _local_path(base_path: str, what: str) -> str:
    if base_path.startswith("file://"):
        base_path = base_path[len("file://"):]
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", base_path):
        raise ModelConfigError(f"{what}: base_path {base_path} is a remote URI; sgserve reads models from the "
                               f"local file system (copy the model to a local directory)")
    return os.path.abspath(base_path)


def _syntax_error(exc: Any, text: str, source: str, proto: Any) -> ModelConfigError:
    line, column = exc.GetLine(), exc.GetColumn()
    message = re.sub(r"^\d+:\d+ : ", "", str(exc)).rstrip(".")
    if line is None and re.search(r"^\s*custom_model_config\b", text, re.MULTILINE):
        return ModelConfigError(f"{source}: custom_model_config is not supported; list the models in "
                                f"model_config_list {{ config {{ ... }} }} ({message})")
    hint = _FILE_HINT
    unknown = re.search(r'Message type "([\w.]+)" has no field named', message)
    if unknown:
        try:
            fields = proto.DESCRIPTOR.file.pool.FindMessageTypeByName(unknown.group(1)).fields
            hint = f"(valid fields there: {', '.join(f.name for f in fields)})"
        except KeyError:
            pass
    where = f"{source}:{line}:{column}" if line is not None else source
    return ModelConfigError(f"{where}: syntax error: {message} {hint}")


def _where(source: str, text: str, name: str, nth: int = 1) -> str:
    """``source:line`` of the nth entry that names ``name`` (the proto keeps no positions, so search)."""
    pattern = re.compile(r"\bname\s*:\s*(['\"])" + re.escape(name) + r"\1")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line.split("#", 1)[0]):
            nth -= 1
            if nth == 0:
                return f"{source}:{number}"
    return source


__all__ = ["ModelConfigError", "VersionPolicy", "ModelConfig", "parse_model_server_config",
           "load_model_server_config", "parse_version_policy", "LATEST", "ALL", "SPECIFIC"]
