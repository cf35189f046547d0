"""TF Serving's flag spellings on `sgserve start`, so that a `tensorflow_model_server` launch line runs
unchanged.

The command line is translated before click parses it: ``--model_base_path=/m`` becomes
``--model-base-path /m``, ``--enable_batching=false`` becomes ``--no-enable-batching``, and TF Serving's
flags that name the same thing differently are converted (``--load_retry_interval_micros``).
The options themselves still come from one place, the ServerConfig declaration (sgserve/settings.py);
this module only knows spellings. Flags of tensorflow_model_server that mean nothing here (its list is
tensorflow_serving/model_servers/main.cc) are accepted with one warning line each; anything else that
is not an option is refused with the nearest known name.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Callable

import click

from sgserve import settings

# TF Serving's model name when --model_base_path is given without --model_name (Server::Options).
TFS_DEFAULT_MODEL_NAME = "default"

# TF Serving flags whose sgserve setting has the same name and meaning.
SAME = ("port", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms", "model_name", "model_base_path",
        "model_config_file", "model_config_file_poll_wait_seconds", "file_system_poll_wait_seconds",
        "enable_batching", "batching_parameters_file", "enable_model_warmup", "max_num_load_retries",
        "monitoring_config_file", "ssl_config_file", "allow_version_labels_for_unavailable_models")


def _micros_to_seconds(value: str) -> str | None:
    """TF Serving's retry interval is in microseconds, and a negative one means "do not wait"."""
    try:
        micros = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an integer number of microseconds",
                                 param_hint="'--load_retry_interval_micros'") from None
    return f"{max(micros, 0) / 1e6:g}"


def _zero_means_default(value: str) -> str | None:
    """TF Serving's 0 means "let TensorFlow choose": sgserve's own default (sized to the worker's cores)."""
    return None if value.strip() == "0" else value


# TF Serving flags with another name here: flag -> (ServerConfig field, value converter; None drops it).
RENAMED: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "load_retry_interval_micros": ("load_retry_interval", _micros_to_seconds),
    "tensorflow_intra_op_parallelism": ("intra_op_threads", _zero_means_default),
    "tensorflow_inter_op_parallelism": ("inter_op_threads", _zero_means_default),
}

_NO_GPU = "sgserve runs TensorFlow on CPU cores"
_GRPC = "sgserve's gRPC front door sets its own server options"
# tensorflow_model_server flags that mean nothing here: flag -> (takes a value, why it is ignored).
IGNORED: dict[str, tuple[bool, str]] = {
    "grpc_socket_path": (True, "sgserve's gRPC front door listens on --port only"),
    "rest_api_enable_cors_support": (False, "the REST front door sends no CORS headers"),
    "enable_per_model_batching_parameters": (False, "batching parameters come from --batching_parameters_file"),
    "num_load_threads": (True, "the loader service writes one version at a time"),
    "num_unload_threads": (True, "versions are unloaded by the broker's rollout, one worker at a time"),
    "flush_filesystem_caches": (False, "versions are read once into shared memory"),
    "tensorflow_session_parallelism": (True, "use --tensorflow_intra_op_parallelism / --cpus-per-worker"),
    "tensorflow_session_config_file": (True, "each worker's TensorFlow threads follow --cpus-per-worker"),
    "use_alts_credentials": (False, "use --ssl_config_file for TLS"),
    "platform_config_file": (True, "sgserve serves TensorFlow SavedModels only"),
    "per_process_gpu_memory_fraction": (True, _NO_GPU),
    "saved_model_tags": (True, "sgserve loads the `serve` meta graph"),
    "grpc_channel_arguments": (True, _GRPC),
    "grpc_max_threads": (True, _GRPC),
    "num_request_iterations_for_warmup": (True, "each warmup request runs once per worker"),
    "version": (False, "`sgserve --version` prints sgserve's version"),
    "remove_unused_fields_from_bundle_metagraph": (False, "workers keep no MetaGraphDef after load"),
    "prefer_tflite_model": (False, "sgserve serves TensorFlow SavedModels only"),
    "num_tflite_pools": (True, "sgserve serves TensorFlow SavedModels only"),
    "num_tflite_interpreters_per_pool": (True, "sgserve serves TensorFlow SavedModels only"),
    "enable_signature_method_name_check": (False, "signatures are served whatever their method name"),
    "xla_cpu_compilation_enabled": (False, "sgserve runs the models' graphs without XLA JIT"),
    "xla_gpu_compilation_enabled": (False, _NO_GPU),
    "enable_profiler": (False, "sgserve has no profiler service"),
    "thread_pool_factory_config_file": (True, "each worker's TensorFlow threads follow --cpus-per-worker"),
    "mixed_precision": (True, "models run as exported"),
    "skip_initialize_tpu": (False, "sgserve runs TensorFlow on CPU cores"),
    "enable_grpc_healthcheck_service": (False, "use the REST port's /healthz or the model status"),
    "enable_serialization_as_tensor_content": (False, "replies use TF Serving's default encoding"),
}

_TRUE, _FALSE = ("true", "1"), ("false", "0")


@dataclasses.dataclass
class Translation:
    """sgserve's own spelling of a command line, and one warning per ignored TF Serving flag."""

    args: list[str]
    warnings: list[str]


@dataclasses.dataclass
class _Chunk:
    """The tokens one flag became, and what it set (to drop what --model_config_file overrides)."""

    field: str | None
    tokens: list[str]
    tfs_spelling: bool = False


def translate(args: list[str], env: dict[str, str] | None = None) -> Translation:
    """See the module docstring. Raises click.UsageError (exit 2) for a flag that is no option."""
    env = dict(os.environ) if env is None else env
    declared = {d.name: d for d in settings.declared()}
    off_spellings = {d.on_off[1][2:]: d for d in declared.values() if d.type is bool and d.on_off[1]}
    chunks: list[_Chunk] = []
    warnings: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            chunks.append(_Chunk(None, args[i:]))
            break
        if not arg.startswith("--") or arg == "--help":
            chunks.append(_Chunk(None, [arg]))
            i += 1
            continue
        chunk, i = _flag(args, i, declared, off_spellings, warnings)
        if chunk is not None:
            chunks.append(chunk)
    return Translation(_tfs_model_flags(chunks, warnings, env), warnings)


def _flag(args: list[str], i: int, declared: dict[str, settings.Declared],
          off_spellings: dict[str, settings.Declared], warnings: list[str]) -> tuple[_Chunk | None, int]:
    """The flag at ``args[i]`` in sgserve's spelling (None: nothing to pass on), and the index after it
    and its value."""
    arg = args[i]
    i += 1
    name, eq, value = arg[2:].partition("=")
    if name in IGNORED:
        takes_value, why = IGNORED[name]
        warnings.append(f"sgserve: warning: TF Serving's --{name} is ignored: {why}")
        return None, i + 1 if takes_value and not eq else i
    field, convert = RENAMED.get(name, (name.replace("-", "_"), None))
    d = declared.get(field)
    if d is not None and d.type is bool:
        return _Chunk(field, [_bool_spelling(d, arg, value if eq else None)], "_" in name), i
    if d is not None:
        if not eq:
            if i >= len(args):  # no value: click says so
                return _Chunk(field, [d.flag]), i
            value, i = args[i], i + 1
        converted = convert(value) if convert else value
        return (_Chunk(field, [d.flag, converted], "_" in name) if converted is not None else None), i
    negated = off_spellings.get(name.replace("_", "-"))
    if negated is not None:
        if eq:
            raise click.BadOptionUsage(arg, f"--{name} takes no value (write --{negated.dashed}={value})")
        return _Chunk(negated.name, [negated.on_off[1]]), i
    raise click.NoSuchOption(f"--{name}", possibilities=_nearest(name, declared, off_spellings))


def _bool_spelling(d: settings.Declared, arg: str, value: str | None) -> str:
    """``--x``, ``--x=true|1`` -> the on spelling; ``--x=false|0`` -> the off one."""
    on, off = d.on_off
    if value is None or value.lower() in _TRUE:
        return on
    if value.lower() in _FALSE:
        return off
    raise click.BadOptionUsage(arg, f"{arg}: a boolean flag takes true, false, 1 or 0, got {value!r}")


def _tfs_model_flags(chunks: list[_Chunk], warnings: list[str], env: dict[str, str]) -> list[str]:
    """TF Serving's rules for its model flags: --model_config_file makes --model_name and
    --model_base_path ignored, and --model_base_path alone serves the model as "default"."""
    given = {c.field for c in chunks}
    if "model_config_file" in given:
        for c in chunks:
            if c.tfs_spelling and c.field in ("model_name", "model_base_path"):
                warnings.append(f"sgserve: warning: --{c.field} is ignored: --model_config_file is set "
                                f"(as in TF Serving)")
        chunks = [c for c in chunks if not (c.tfs_spelling and c.field in ("model_name", "model_base_path"))]
    tfs_base = any(c.tfs_spelling and c.field == "model_base_path" for c in chunks)
    named = "model_name" in {c.field for c in chunks} or any(
        k in env for k in ("SGSERVE_MODEL_NAME", "SGSERVE_START_MODEL_NAME"))
    if tfs_base and not named:
        chunks.append(_Chunk("model_name", ["--model-name", TFS_DEFAULT_MODEL_NAME]))
    return [token for c in chunks for token in c.tokens]


def _nearest(name: str, declared: dict[str, Any], off_spellings: dict[str, Any]) -> list[str]:
    """The closest known flag, in the family of spelling the person used (TF Serving's or sgserve's)."""
    tfs = set(SAME) | set(RENAMED) | set(IGNORED) | set(declared)
    ours = {d.dashed for d in declared.values()} | set(off_spellings)
    family = tfs if "_" in name else ours if "-" in name else tfs | ours
    return [f"--{m}" for m in difflib.get_close_matches(name, sorted(family), n=1, cutoff=0.6)]


def known_tfs_flags() -> list[str]:
    """Every TF Serving flag `sgserve start` accepts (with meaning or with a warning)."""
    return sorted({*SAME, *RENAMED, *IGNORED})


class TfsFlagsCommand(click.Command):
    """A click command that reads TF Serving's spellings too (translated before click parses)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            translated = translate(args)
        except click.UsageError as exc:
            exc.ctx = ctx
            raise
        if not ctx.resilient_parsing:
            for line in translated.warnings:
                click.echo(line, err=True)
        return super().parse_args(ctx, translated.args)
