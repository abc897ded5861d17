"""IPUConfig: the schema of `ipu_config.json`, loading and saving, overrides, validation, layer -> stage map.

The attribute set, defaults and behaviour follow optimum-graphcore's IPUConfig (its
`optimum/graphcore/ipu_configuration.py`), with its known gaps fixed: deprecated keys are accepted with a warning,
string overrides use the declared field types, and every change is validated: a field alone when it is assigned,
the relations between fields by `update()`, `validate()` and every method the runtime calls, so that fields can be
assigned one at a time through inconsistent states (as optimum-graphcore code does).

Stored values are what the user wrote: `None` in an `inference_*` field (or in `ipus_per_replica`) means "derive
it", so that overriding `layers_per_ipu` also moves an inference layout that was never set. Reading an attribute
gives the derived value; `to_dict()` gives the stored ones, which makes the round trip exact.
"""
import contextlib
import copy
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union, get_args, get_origin

from .errors import UserError

logger = logging.getLogger("ipu_train")

IPU_CONFIG_NAME = "ipu_config.json"
MODES = ("training", "inference")
POD_TYPES = ("pod4", "pod8", "pod16", "pod32", "pod64")
OUTPUT_MODES = ("all", "sum", "final", "default")
METADATA_KEYS = ("optimum_version", "transformers_version")
DEPRECATED_KEYS = {
    "enable_half_first_order_momentum": "set the optimizer state precision with the optimizer instead",
    "sharded_execution_for_inference": "inference always uses sharded execution",
    "use_popdist": "the launcher, torchrun or poprun, sets up distribution",
    "profile_dir": "use the profiler of the backend instead",
    "decompose_grad_sum": "it no longer changes the compiled program",
    "execute_encoder_on_cpu_for_generation": "it was never implemented",
}
# Fields that keep meaning on IPUs only; the trainer logs them once when set (the README's "IPU configurations"
# says what each becomes on PyTorch).
IPU_ONLY_FIELDS = (
    "matmul_proportion",
    "inference_matmul_proportion",
    "output_mode",
    "explicit_ir_inference",
    "parallelize_kwargs",
    "inference_parallelize_kwargs",
)


class IPUConfigError(UserError, ValueError):
    """An IPU configuration that cannot be used: the message names the key and says what to change."""


# ---------------------------------------------------------------------------------------------------------------
# Value kinds: each checks a Python value (from JSON or code) and parses the text of a string override.


def _parse_list(text: str) -> list:
    """`[1 3 4 4]`, `[1,3,4,4]` or `[1, 3 4]`: brackets required, items split on commas and spaces."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError("a list must be written in brackets")
    return [item for item in text[1:-1].replace(",", " ").split()]


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError
    return float(value)


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise ValueError


def _int_list(value: Any) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError
    return [_to_int(v) for v in value]


def _float_or_float_list(value: Any):
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError
        return [_to_float(v) for v in value]
    return _to_float(value)


def _parse_float_or_list(text: str):
    text = text.strip()
    if text.startswith("["):
        return [float(v) for v in _parse_list(text)]
    return float(text)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _to_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError
    return copy.deepcopy(value)


@dataclass(frozen=True)
class _Kind:
    description: str  # what the error message asks for
    check: Callable[[Any], Any]  # value -> normalised value, ValueError when the type is wrong
    parse: Callable[[str], Any]  # override text -> value, ValueError when it cannot be read


INT = _Kind("an integer", _to_int, lambda text: int(text.strip()))
BOOL = _Kind("a boolean (true/false, 1/0, yes/no, y/n)", _to_bool, _parse_bool)
STR = _Kind("a string", _to_str, lambda text: text.strip())
INT_LIST = _Kind("a list of integers such as [0 4 4 4]", _int_list, lambda text: [int(v) for v in _parse_list(text)])
FLOAT_OR_LIST = _Kind(
    "a float or a list of floats such as [0.1 0.25 0.25 0.25]", _float_or_float_list, _parse_float_or_list
)
DICT = _Kind('a JSON object such as {"key": 1}', _to_dict, lambda text: json.loads(text))


# The type a field is declared with -> its kind; Optional[...] makes null a value.
_KINDS = {int: INT, bool: BOOL, str: STR, list[int]: INT_LIST, Union[float, list[float]]: FLOAT_OR_LIST, dict: DICT}


def _kind_of(annotation) -> tuple:
    """(kind, optional) for a field's declared type."""
    args = get_args(annotation)
    if get_origin(annotation) is Union and type(None) in args:
        return _KINDS[Union[tuple(arg for arg in args if arg is not type(None))]], True
    return _KINDS[annotation], False


class Field:
    """One key of ipu_config.json, declared on IPUConfig as `name: type = Field(default, doc)`. The declared type is
    what files, code and overrides must give; Optional means null is a value ("unset", or "derive it" where
    `derive` is given). Reading gives the derived value; an assignment checks this field alone, its type and range
    (IPUConfig.validate checks the relations)."""

    def __init__(self, default, doc: str, *, layout=False, null_is_default=False, derive=None):
        self.default = default
        self.__doc__ = doc
        self.layout = layout  # in inference mode, reading or assigning `name` goes to `inference_<name>`
        self.null_is_default = null_is_default  # older files wrote null for these; read it as the default
        self.derive = derive  # config -> the value a stored None stands for

    def __set_name__(self, owner, name):
        self.name = name
        self.kind, self.optional = _kind_of(owner.__annotations__[name])

    def _target(self, obj) -> str:
        if self.layout and obj._mode == "inference":
            return f"inference_{self.name}"
        return self.name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return copy.deepcopy(obj._derived(self._target(obj)))

    def __set__(self, obj, value):
        name = self._target(obj)
        value = _checked(FIELDS[name], value)
        _check_field(name, value)
        obj._values[name] = value


COUNT_FIELDS = (
    "replication_factor",
    "inference_replication_factor",
    "gradient_accumulation_steps",
    "device_iterations",
    "inference_device_iterations",
    "ipus_per_replica",
    "inference_ipus_per_replica",
    "embedding_serialization_factor",
    "inference_embedding_serialization_factor",
    "projection_serialization_factor",
    "inference_projection_serialization_factor",
)


def _is_per_pod(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= set(POD_TYPES) | {"default"}


def _nearest_key(key: str) -> str:
    candidates = list(FIELDS) + list(DEPRECATED_KEYS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return close[0]


def _unknown_key_error(key: str, where: str) -> IPUConfigError:
    return IPUConfigError(
        f"{where}: unknown key '{key}'; did you mean '{_nearest_key(key)}'? (the valid keys are those of "
        f"ipu_config.json, see ipu_train/config.py)"
    )


def _is_field(key: str, where: str) -> bool:
    """Whether `key` names a field to set: metadata keys are dropped, deprecated keys dropped with one warning,
    unknown keys refused with the nearest valid key."""
    if key in METADATA_KEYS:
        return False
    if key in DEPRECATED_KEYS:
        logger.warning("ipu_config key '%s' is deprecated and ignored (%s): remove it", key, DEPRECATED_KEYS[key])
        return False
    if key not in FIELDS:
        raise _unknown_key_error(key, where)
    return True


def _checked(field: Field, value: Any) -> Any:
    """The value normalised to the field's declared type; per-pod dictionaries are checked entry by entry."""
    if value is None and field.null_is_default:
        return copy.deepcopy(field.default)
    if value is None and field.optional:
        return None
    if _is_per_pod(value) and field.kind is not DICT:
        return {pod: _checked(field, v) for pod, v in value.items()}
    try:
        return field.kind.check(value)
    except (ValueError, TypeError):
        nullable = " or null" if field.optional else ""
        raise IPUConfigError(
            f"{field.name} must be {field.kind.description}{nullable}, not {json.dumps(value, default=repr)}"
        ) from None


class IPUConfig:
    """The IPU configuration: `IPUConfig(**values)`, `IPUConfig.from_pretrained(path_or_hub_name, **overrides)`.

    The fields below are the keys of ipu_config.json, in the order it is written; any of them may instead hold a
    per-pod dictionary ({"pod16": ..., "default": ...}) until `for_pod_type` resolves it."""

    layers_per_ipu: list[int] = Field(
        [-1], "layers on each IPU of a replica (one pipeline stage each); -1 shares out the remaining layers",
        layout=True)
    inference_layers_per_ipu: Optional[list[int]] = Field(
        None, "layers_per_ipu for evaluation; null: layers_per_ipu",
        derive=lambda config: config._values["layers_per_ipu"])
    ipus_per_replica: Optional[int] = Field(
        None, "IPUs one replica spans; null: the length of layers_per_ipu", layout=True,
        derive=lambda config: len(config._values["layers_per_ipu"]))
    inference_ipus_per_replica: Optional[int] = Field(
        None, "ipus_per_replica for evaluation; null: the length of inference_layers_per_ipu, else ipus_per_replica",
        derive=lambda config: config._default_inference_ipus_per_replica())
    matmul_proportion: Union[float, list[float]] = Field(
        0.2, "share of each IPU's memory for matmul temporaries: one float, or one per IPU", layout=True)
    inference_matmul_proportion: Optional[Union[float, list[float]]] = Field(
        None, "matmul_proportion for evaluation; null: matmul_proportion where it fits, else 0.2",
        derive=lambda config: config._default_inference_matmul_proportion())
    embedding_serialization_factor: int = Field(
        1, "the word embedding computed in this many parts on one IPU", layout=True, null_is_default=True)
    inference_embedding_serialization_factor: Optional[int] = Field(
        None, "embedding_serialization_factor for evaluation; null: derived from the training embedding layout",
        derive=lambda config: config._default_inference_factor("embedding"))
    serialized_embedding_splits_per_ipu: Optional[list[int]] = Field(
        None, "parts of the word embedding on each IPU (consecutive IPUs); null: not spread", layout=True)
    inference_serialized_embedding_splits_per_ipu: Optional[list[int]] = Field(
        None, "serialized_embedding_splits_per_ipu for evaluation; null: the training splits where they fit",
        derive=lambda config: config._default_inference_splits("embedding"))
    projection_serialization_factor: int = Field(
        1, "the output projection computed in this many parts on one IPU", layout=True, null_is_default=True)
    inference_projection_serialization_factor: Optional[int] = Field(
        None, "projection_serialization_factor for evaluation; null: derived from the training projection layout",
        derive=lambda config: config._default_inference_factor("projection"))
    serialized_projection_splits_per_ipu: Optional[list[int]] = Field(
        None, "parts of the output projection on each IPU (consecutive IPUs); null: not spread", layout=True)
    inference_serialized_projection_splits_per_ipu: Optional[list[int]] = Field(
        None, "serialized_projection_splits_per_ipu for evaluation; null: the training splits where they fit",
        derive=lambda config: config._default_inference_splits("projection"))
    parallelize_kwargs: dict = Field(
        {}, "keyword arguments for the model's parallelisation", layout=True, null_is_default=True)
    inference_parallelize_kwargs: Optional[dict] = Field(
        None, "parallelize_kwargs for evaluation; null: parallelize_kwargs",
        derive=lambda config: config._values["parallelize_kwargs"])
    replication_factor: int = Field(1, "replicas trained data-parallel")
    inference_replication_factor: int = Field(1, "replicas evaluating data-parallel")
    gradient_accumulation_steps: int = Field(1, "micro-batches whose gradients make one optimizer step")
    device_iterations: int = Field(1, "optimizer steps run per call from the host")
    inference_device_iterations: int = Field(1, "evaluation batches run per call from the host")
    optimizer_state_offchip: bool = Field(False, "keep the optimizer state in off-chip memory")
    replicated_tensor_sharding: bool = Field(False, "shard the optimizer state over the replicas")
    enable_half_partials: bool = Field(True, "accumulate matmul partial sums in half precision")
    recompute_checkpoint_every_layer: bool = Field(
        False, "recompute activations in the backward pass from a checkpoint at each layer")
    output_mode: str = Field("final", "which results of a call return to the host: one of OUTPUT_MODES")
    seed: Optional[int] = Field(None, "random seed of the device; null: unset")
    auto_loss_scaling: bool = Field(False, "adjust the loss scale automatically (half-precision training)")
    executable_cache_dir: str = Field("", "directory caching compiled executables; empty: no cache")
    explicit_ir_inference: bool = Field(False, "compile evaluation with explicit IR")

    def __init__(self, **values):
        self._mode = "training"
        self._values = {name: copy.deepcopy(field.default) for name, field in FIELDS.items()}
        self.update(**values)

    # --- loading and saving ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides) -> "IPUConfig":
        """Load from a directory holding ipu_config.json, a .json file, or a hub repository name."""
        path = _resolve_config_file(str(name_or_path))
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise IPUConfigError(f"{path} is not valid JSON ({error}): fix the file") from None
        if not isinstance(values, dict):
            raise IPUConfigError(f"{path} must hold one JSON object of ipu_config keys")
        try:
            return cls(**{**values, **overrides})
        except IPUConfigError as error:
            raise IPUConfigError(f"{path}: {error}") from None

    def save_pretrained(self, save_directory) -> str:
        """Write `save_directory/ipu_config.json` and return its path; an inconsistent configuration is refused, as
        loading the file would refuse it."""
        self.validate()
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(str(save_directory), IPU_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return path

    def to_dict(self) -> dict:
        """The stored values, every field, in schema order (None where a value is derived)."""
        return copy.deepcopy(self._values)

    def to_json_string(self) -> str:
        """JSON with one key per line and each value on it, which keeps lists readable."""
        lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in self.to_dict().items()]
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def __setattr__(self, name, value):
        # A typo such as `layer_per_ipu` would otherwise add an attribute that nothing reads.
        if name.startswith("_") or hasattr(type(self), name) or _is_field(name, "IPUConfig attribute"):
            super().__setattr__(name, value)

    def __eq__(self, other):
        return isinstance(other, IPUConfig) and self._values == other._values

    def __repr__(self):
        return f"IPUConfig({self.to_json_string()})"

    # --- changing values ---------------------------------------------------------------------------------------

    def update(self, **values) -> "IPUConfig":
        """Set several fields at once, then validate; on an error nothing is changed. Metadata keys are dropped,
        deprecated keys dropped with one warning each, unknown keys refused."""
        checked = {}
        for key, value in values.items():
            if _is_field(key, "IPU configuration"):
                checked[key] = _checked(FIELDS[key], value)
                _check_field(key, checked[key])
        previous = self._values
        self._values = {**previous, **checked}
        try:
            self.validate()
        except IPUConfigError:
            self._values = previous
            raise
        return self

    def update_from_string(self, update_str: str) -> "IPUConfig":
        """Apply `--ipu_config_overrides "k=v,k=v"`; lists as `[1 3 4 4]` or `[1,3,4,4]`; null clears a field."""
        values = {}
        for item in _split_top_level(update_str):
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise IPUConfigError(
                    f"--ipu_config_overrides: '{item.strip()}' is not key=value (separate items with commas)"
                )
            values[key] = _parse_override(key, text)
        return self.update(**values)

    def for_pod_type(self, pod_type: Optional[str] = None) -> "IPUConfig":
        """A new IPUConfig with every per-pod dictionary resolved for `pod_type` (None: the "default" entries)."""
        if pod_type is not None and pod_type not in POD_TYPES:
            raise IPUConfigError(f"--pod_type {pod_type} is not a pod type: use one of {', '.join(POD_TYPES)}")
        values = {}
        for name, value in self._values.items():
            if not _is_per_pod(value) or FIELDS[name].kind is DICT:
                values[name] = value
            elif pod_type is None and "default" not in value:
                raise IPUConfigError(
                    f"{name} has per-pod values for {', '.join(value)} and no \"default\": pass --pod_type "
                    f"(one of {', '.join(value)})"
                )
            elif pod_type is None:
                values[name] = value["default"]
            elif pod_type not in value:
                raise IPUConfigError(
                    f"{name} has no value for --pod_type {pod_type}: use one of "
                    f"{', '.join(k for k in value if k != 'default')} or add a \"{pod_type}\" entry"
                )
            else:
                values[name] = value[pod_type]
        resolved = IPUConfig(**values)
        resolved._mode = self._mode
        return resolved

    def apply_n_ipu(self, n_ipu: int) -> "IPUConfig":
        """`--n_ipu`: replication_factor = n_ipu // ipus_per_replica, and likewise for inference."""
        self._ready()
        if isinstance(n_ipu, bool) or not isinstance(n_ipu, int) or n_ipu < 1:
            raise IPUConfigError(f"--n_ipu must be a positive integer, not {n_ipu!r}")
        replicas = {}
        for prefix in ("", "inference_"):
            per_replica = self._derived(f"{prefix}ipus_per_replica")
            if n_ipu % per_replica:
                raise IPUConfigError(
                    f"--n_ipu {n_ipu} is not a multiple of {prefix}ipus_per_replica={per_replica}: use a multiple "
                    f"of {per_replica} (one replica needs {per_replica} IPUs)"
                )
            replicas[f"{prefix}replication_factor"] = n_ipu // per_replica
        return self.update(**replicas)

    # --- modes ------------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @contextlib.contextmanager
    def in_mode(self, mode: str):
        """`with ipu_config.in_mode("inference"):` reads and writes the inference layout inside the block; the
        previous mode comes back on exit, errors included."""
        previous = self._mode
        self._switch(mode)
        try:
            yield self
        finally:
            self._mode = previous

    def train(self) -> "IPUConfig":
        """Switch to the training layout for good (optimum-graphcore's API; `in_mode` switches for a block)."""
        return self._switch("training")

    def eval(self) -> "IPUConfig":
        """Switch to the inference layout for good (optimum-graphcore's API; `in_mode` switches for a block)."""
        return self._switch("inference")

    def _switch(self, mode: str) -> "IPUConfig":
        # Validated, as the runtime switches mode before it reads the layout.
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.validate()
        self._mode = mode
        return self

    # --- what the runtime asks --------------------------------------------------------------------------------

    def batch_size_factor(self, for_inference: bool = False) -> int:
        """Samples per data-loader item divided by the micro-batch size."""
        self._ready()
        if for_inference:
            return self.inference_replication_factor * self.inference_device_iterations
        return self.replication_factor * self.gradient_accumulation_steps * self.device_iterations

    def layer_stages(self, num_layers: int) -> list:
        """The stage (IPU) index of each of the model's `num_layers` layers, for the current mode."""
        return [stage for stage, count in enumerate(self.layers_per_stage(num_layers)) for _ in range(count)]

    def layers_per_stage(self, num_layers: int) -> list:
        """How many layers each stage holds, wildcards expanded, for the current mode."""
        self._ready()
        return _expand_layers_per_ipu(
            self.layers_per_ipu,
            self.ipus_per_replica,
            num_layers,
            self._source_key("layers_per_ipu"),
            self._source_key("ipus_per_replica"),
        )

    # --- the IPU target ------------------------------------------------------------------------------------------
    # What PopTorch/PopART refuse at compile time (after minutes of tracing), checked from the configuration alone so
    # that an IPU run stops before any data is read. CPU/GPU runs do not pipeline: nothing here applies to them.

    def pipeline_ipus(self) -> list:
        """The IPUs the training forward pass runs on, in order, one entry per pipeline stage. PopART counts the
        forward stages as the IPU switches + 1 (poptorch popart_compiler/source/Compiler.cpp: Compiler::setActiveIpu
        counts a switch each time the IPU changes; CompilerImpl::numPipelineStages). The forward starts on IPU 0
        (embeddings), visits each IPU that holds layers, in order, and ends on IPU 0: the heads go there, as in the
        stage plan and optimum-graphcore (every shipped family's LM head is tied to the word embedding, and a tied
        weight cannot cross IPUs when pipelining: popart willow/src/transforms/pipeline.cpp). Read from
        layers_per_ipu: an IPU whose entry is not 0 holds layers (a -1 share of a model with fewer layers than IPUs
        can be empty, which only lowers the true count)."""
        self._ready()
        ipus = self._derived("ipus_per_replica")
        layers = self._values["layers_per_ipu"]
        if ipus == 1:
            return [0]
        holders = range(ipus) if layers == [-1] else [ipu for ipu, count in enumerate(layers) if count != 0]
        path = []
        for ipu in (0, *holders, 0):
            if not path or path[-1] != ipu:
                path.append(ipu)
        return path

    def pipeline_stages(self) -> int:
        """Forward pipeline stages of the training layout on IPU (see pipeline_ipus)."""
        return len(self.pipeline_ipus())

    def min_gradient_accumulation(self) -> int:
        """The least gradient_accumulation_steps pipelined training compiles with: 2 x forward stages - 1 (the
        backward adds a stage per forward stage but the last; PopART Compiler.cpp: Compiler::initSession refuses
        fewer). Our IPU backend trains with PipelinedExecution (backends/poptorch.py build_options), as
        optimum-graphcore's IPUConfig._to_options does; one stage needs 1."""
        return 2 * self.pipeline_stages() - 1

    def ipus_needed(self, for_inference: bool = False) -> int:
        """IPUs PopTorch reserves: ipus_per_replica x replication_factor (or the inference ones), rounded up to a
        power of two (popart_compiler/source/CompilerImpl.cpp: createDevice, Utils.cpp: roundUpNumIPUs; our backend
        sets autoRoundNumIPUs(True) as optimum-graphcore does)."""
        self._ready()
        prefix = "inference_" if for_inference else ""
        return _power_of_two_at_least(
            self._derived(f"{prefix}ipus_per_replica") * self._derived(f"{prefix}replication_factor"))

    def check_for_ipu(self, n_ipu: Optional[int] = None, pod_type: Optional[str] = None,
                      training: bool = True) -> "IPUConfig":
        """Refuse, in one line naming the key and the fix, what the IPU target would refuse when compiling: a
        gradient accumulation below what the training pipeline needs (only when `training`), and more IPUs than
        `--n_ipu` / `--pod_type` make available (none given: the machine is not known, not checked). Inference
        runs sharded (ShardedExecution in backends/poptorch.py and optimum-graphcore), not pipelined, so PopART's
        inference rule (device iterations >= stages) does not apply to it."""
        self._ready()
        if training:
            self._check_accumulation()
            for part in ("embedding", "projection"):
                self._check_training_splits(part)
        if n_ipu is not None:
            available, flag = n_ipu, f"--n_ipu {n_ipu}"
        elif pod_type is not None:
            if pod_type not in POD_TYPES:
                raise IPUConfigError(f"--pod_type {pod_type} is not a pod type: use one of {', '.join(POD_TYPES)}")
            available, flag = int(pod_type[len("pod"):]), f"--pod_type {pod_type}"
        else:
            return self
        for prefix in ("", "inference_"):
            self._check_ipus_available(prefix, available, flag)
        return self

    def _check_accumulation(self):
        needed, steps = self.min_gradient_accumulation(), self._values["gradient_accumulation_steps"]
        if steps < needed:
            stages, path = self.pipeline_stages(), " -> ".join(str(ipu) for ipu in self.pipeline_ipus())
            raise IPUConfigError(
                f"gradient_accumulation_steps={steps} is below the {needed} that pipelined training over {stages} "
                f"stages needs on IPU (2 x {stages} - 1; IPU {path} from layers_per_ipu="
                f"{self._values['layers_per_ipu']}, the head back on IPU 0): pass --gradient_accumulation_steps "
                f"{needed} or more (or --ipu_config_overrides gradient_accumulation_steps={needed})")

    def _check_training_splits(self, part: str):
        """A serialized embedding or projection spread over IPUs in training would use its weight, tied to the
        other and kept on IPU 0, on several IPUs: PopART cannot copy a weight between IPUs when pipelining
        (willow/src/transforms/pipeline.cpp: setIPUCopyPipelineStage). Spreading is for the inference layout."""
        key = f"serialized_{part}_splits_per_ipu"
        splits = self._values[key]
        if splits is None or [ipu for ipu, count in enumerate(splits) if count] in ([], [0]):
            return
        raise IPUConfigError(
            f"{key}={splits} spreads the {part} over IPUs in training, where its weight (tied, on IPU 0) cannot "
            f"cross IPUs when pipelining: pass --ipu_config_overrides {key}=null,{part}_serialization_factor="
            f"{sum(splits)} (spread only inference_{key})")

    def _check_ipus_available(self, prefix: str, available: int, flag: str):
        per_replica = self._derived(f"{prefix}ipus_per_replica")
        replicas = self._derived(f"{prefix}replication_factor")
        needed = self.ipus_needed(for_inference=bool(prefix))
        if needed <= available:
            return
        asked = per_replica * replicas
        rounded = "" if needed == asked else f", which PopTorch rounds up to {needed} (a power of two),"
        fits = [r for r in range(replicas - 1, 0, -1) if _power_of_two_at_least(per_replica * r) <= available]
        fix = (f"set {prefix}replication_factor={fits[0]} (--ipu_config_overrides {prefix}replication_factor="
               f"{fits[0]})" if fits else f"lay the model over at most {available} IPUs ({prefix}layers_per_ipu)")
        raise IPUConfigError(
            f"{prefix}replication_factor={replicas} x {prefix}ipus_per_replica={per_replica} needs "
            f"{asked} IPUs{rounded} but {flag} has {available}: {fix}, or run on more IPUs")

    def _source_key(self, name: str) -> str:
        """The key that holds the current mode's value: an unset inference_* field follows the training one, and
        the message should name what the user wrote (the scripts check the inference layout first)."""
        inference_name = f"inference_{name}"
        if self._mode == "inference" and self._values[inference_name] is not None:
            return inference_name
        return name

    def unused_on_pytorch(self) -> list:
        """Fields set to a non-default value that have no effect on PyTorch (the trainer logs them once)."""
        return [name for name in IPU_ONLY_FIELDS if self._values[name] != FIELDS[name].default]

    # --- derived values ---------------------------------------------------------------------------------------

    def _derived(self, name: str):
        """The value a field stands for: stored, or derived from the training values when stored as None."""
        stored = self._values[name]
        derive = FIELDS[name].derive
        if stored is not None or derive is None:
            return stored
        self._require_resolved()
        return derive(self)

    def _default_inference_matmul_proportion(self):
        training = self._values["matmul_proportion"]
        # A per-IPU list only carries over when the inference pipeline has as many IPUs.
        fits = not isinstance(training, list) or len(training) == self._derived("inference_ipus_per_replica")
        return training if fits else 0.2

    def _default_inference_ipus_per_replica(self) -> int:
        inference_layers = self._values["inference_layers_per_ipu"]
        training_ipus = self._derived("ipus_per_replica")
        if inference_layers is None:
            return training_ipus
        # As optimum-graphcore: the length of inference_layers_per_ipu, except that a bare [-1] keeps a training
        # width that was set apart from layers_per_ipu (layers_per_ipu=[-1], ipus_per_replica=4).
        if inference_layers == [-1] and training_ipus != len(self._values["layers_per_ipu"]):
            return training_ipus
        return len(inference_layers)

    def _default_inference_splits(self, layer: str):
        if self._values[f"inference_{layer}_serialization_factor"] is not None:
            return None
        training = self._values[f"serialized_{layer}_splits_per_ipu"]
        if training is not None and len(training) == self._derived("inference_ipus_per_replica"):
            return training
        return None

    def _default_inference_factor(self, layer: str) -> int:
        if self._values[f"inference_serialized_{layer}_splits_per_ipu"] is not None:
            return 1
        training_splits = self._values[f"serialized_{layer}_splits_per_ipu"]
        if training_splits is not None and self._derived(f"inference_serialized_{layer}_splits_per_ipu") is None:
            # The training splits do not fit the inference pipeline: serialise into as many parts on one IPU.
            return sum(training_splits)
        return self._values[f"{layer}_serialization_factor"]

    def _per_pod_fields(self) -> list:
        return [name for name, value in self._values.items() if _is_per_pod(value) and FIELDS[name].kind is not DICT]

    def _require_resolved(self):
        unresolved = self._per_pod_fields()
        if unresolved:
            raise IPUConfigError(
                f"{unresolved[0]} still holds per-pod values: resolve them with --pod_type "
                f"(IPUConfig.for_pod_type) first"
            )

    # --- validation -------------------------------------------------------------------------------------------

    def validate(self) -> "IPUConfig":
        """Check the relations between fields (each field alone was checked when it was set). `update()` and every
        method the runtime calls run it, so a configuration assigned field by field fails before it is used."""
        if self._per_pod_fields():
            return self  # the relations between fields are checked once a pod type has been chosen
        for prefix in ("", "inference_"):
            self._validate_layout(prefix)
        return self

    def _ready(self):
        """What the runtime reads must be resolved for one pod type and consistent."""
        self._require_resolved()
        self.validate()

    def _validate_layout(self, prefix: str):
        ipus_name = f"{prefix}ipus_per_replica"
        ipus = self._derived(ipus_name)
        matmul = self._derived(f"{prefix}matmul_proportion")
        if isinstance(matmul, list) and len(matmul) != ipus:
            raise IPUConfigError(
                f"{prefix}matmul_proportion={matmul} has {len(matmul)} entries but {ipus_name}={ipus}: give one "
                f"value per IPU, or a single float"
            )
        layers = self._derived(f"{prefix}layers_per_ipu")
        if -1 not in layers and len(layers) != ipus:
            raise IPUConfigError(
                f"{prefix}layers_per_ipu={layers} has {len(layers)} entries but {ipus_name}={ipus}: give one entry "
                f"per IPU, or set {ipus_name}={len(layers)}"
            )
        for layer in ("embedding", "projection"):
            factor_name = f"{prefix}{layer}_serialization_factor"
            splits_name = f"{prefix}serialized_{layer}_splits_per_ipu"
            factor, splits = self._derived(factor_name), self._derived(splits_name)
            if splits is None:
                continue
            if factor != 1:
                raise IPUConfigError(
                    f"set only one of {factor_name}={factor} and {splits_name}={splits}: the factor serialises the "
                    f"{layer} on one IPU, the splits spread it over IPUs; set {factor_name}=1 to use the splits"
                )
            if len(splits) != ipus:
                raise IPUConfigError(
                    f"{splits_name}={splits} has {len(splits)} entries but {ipus_name}={ipus}: give one entry per IPU"
                )


FIELDS = {name: field for name, field in vars(IPUConfig).items() if isinstance(field, Field)}  # in declared order


def _alternatives(value) -> list:
    """A value, or each entry of a per-pod dictionary."""
    return list(value.values()) if _is_per_pod(value) else [value]


def _power_of_two_at_least(count: int) -> int:
    return 1 << (count - 1).bit_length()


def _check_field(name: str, value):
    """The range of one field's value, which needs no other field; per-pod dictionaries entry by entry."""
    for alternative in _alternatives(value):
        if alternative is not None:
            _check_range(name, alternative)


def _check_range(name: str, value):
    if name in COUNT_FIELDS and value < 1:
        raise IPUConfigError(f"{name}={value} must be at least 1")
    if name.endswith("layers_per_ipu") and min(value) < -1:
        raise IPUConfigError(
            f"{name}={value}: entries must be layer counts >= 0, or -1 for a share of the remaining layers"
        )
    if name.endswith("matmul_proportion"):
        entries = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) and v >= 0 for v in entries):
            raise IPUConfigError(f"{name}={value} must be >= 0 (a fraction of each IPU's memory)")
    if name == "output_mode" and value not in OUTPUT_MODES:
        raise IPUConfigError(f"output_mode={value!r} must be one of {', '.join(OUTPUT_MODES)}")
    if name.endswith("_splits_per_ipu"):
        _check_splits(name, value)


def _check_splits(name: str, splits):
    if min(splits) < 0:
        raise IPUConfigError(f"{name}={splits}: entries must be >= 0 (splits on each IPU)")
    if sum(splits) < 1:
        raise IPUConfigError(f"{name}={splits} must place at least 1 split on some IPU, or be null")
    used = [i for i, count in enumerate(splits) if count]
    if used[-1] - used[0] + 1 != len(used):
        raise IPUConfigError(f"{name}={splits}: the IPUs holding splits must be consecutive, e.g. [0 2 2 0]")


def _expand_layers_per_ipu(layers_per_ipu, ipus, num_layers, layers_name, ipus_name) -> list:
    """Layers on each IPU for a model with `num_layers` layers, following optimum-graphcore's rules."""
    if ipus == 1:
        _check_single_count(layers_per_ipu, num_layers, layers_name)
        return [num_layers]  # every layer on IPU 0, as the original
    if layers_per_ipu in ([-1], [-1] * ipus):
        share, remainder = divmod(num_layers, ipus)
        return [share] * (ipus - 1) + [share + remainder]
    if len(layers_per_ipu) != ipus:
        raise IPUConfigError(
            f"{layers_name}={layers_per_ipu} has {len(layers_per_ipu)} entries but {ipus_name}={ipus}: give one "
            f"entry per IPU, or [-1] to split the layers evenly"
        )
    fixed = sum(count for count in layers_per_ipu if count != -1)
    wildcards = [i for i, count in enumerate(layers_per_ipu) if count == -1]
    if not wildcards:
        if fixed != num_layers:
            raise IPUConfigError(
                f"{layers_name}={layers_per_ipu} does not define the correct number of layers: it places {fixed} "
                f"layers but the model has {num_layers}; make the entries sum to {num_layers}, or use -1 wildcards"
            )
        return list(layers_per_ipu)
    if fixed > num_layers:
        raise IPUConfigError(
            f"{layers_name}={layers_per_ipu} does not define the correct number of layers: its fixed entries "
            f"place {fixed} layers but the model has {num_layers}; lower them"
        )
    share, remainder = divmod(num_layers - fixed, len(wildcards))
    counts = [share if count == -1 else count for count in layers_per_ipu]
    counts[wildcards[-1]] += remainder
    return counts


def _check_single_count(layers_per_ipu, num_layers, layers_name):
    """One IPU takes every layer, but a single count that is not the model's depth is a mistake (a layout written
    for another model), as [2 2] for 6 layers is."""
    if len(layers_per_ipu) == 1 and layers_per_ipu[0] not in (-1, num_layers):
        raise IPUConfigError(
            f"{layers_name}={layers_per_ipu} places {layers_per_ipu[0]} layers on its one IPU but the model has "
            f"{num_layers}: use [-1] (every layer) or [{num_layers}]"
        )


def _split_top_level(text: str) -> list:
    """Split on commas outside brackets and braces, dropping empty items."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item.strip()]


def _parse_override(key: str, text: str):
    if key in DEPRECATED_KEYS:
        return None  # update() warns and skips it
    if key not in FIELDS:
        raise _unknown_key_error(key, "--ipu_config_overrides")
    field = FIELDS[key]
    if text.strip().lower() in ("null", "none") and (field.optional or field.null_is_default):
        return None
    try:
        value = field.kind.parse(text)
    except (ValueError, TypeError):
        value = _ParseFailure
    if value is _ParseFailure or not _kind_accepts(field, value):
        nullable = " or null" if field.optional else ""
        raise IPUConfigError(
            f"--ipu_config_overrides: {key}={text.strip()} is not valid, {key} must be "
            f"{field.kind.description}{nullable}"
        )
    return value


class _ParseFailure:
    pass


def _kind_accepts(field: Field, value) -> bool:
    try:
        field.kind.check(value)
    except (ValueError, TypeError):
        return False
    return True


def _resolve_config_file(name_or_path: str) -> str:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, IPU_CONFIG_NAME)
        if not os.path.isfile(path):
            raise IPUConfigError(f"directory {name_or_path} holds no {IPU_CONFIG_NAME}: point to a directory or file")
        return path
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path.endswith(".json"):
        raise IPUConfigError(f"IPU configuration file {name_or_path} does not exist: check the path")
    return _download_from_hub(name_or_path)


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from .compat import hub_offline

    try:
        return hf_hub_download(repo_id=repo_id, filename=IPU_CONFIG_NAME)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if hub_offline():
            raise IPUConfigError(
                f"IPU configuration '{repo_id}' is not a local directory or .json file, and the Hugging Face Hub is "
                f"offline (HF_HUB_OFFLINE=1) with no cached copy: pass a local path, or go online"
            ) from None
        raise IPUConfigError(
            f"IPU configuration '{repo_id}' is not a local path and could not be downloaded from the Hugging Face "
            f"Hub (no connection?): pass a local path"
        ) from None
    except HFValidationError:
        raise IPUConfigError(
            f"IPU configuration '{repo_id}' is neither a local directory, a .json file nor a hub repository name: "
            f"check the path"
        ) from None
    except Exception as error:  # repository or file missing, access denied, HTTP errors
        raise IPUConfigError(
            f"IPU configuration '{repo_id}' is not a local path and the hub has no {IPU_CONFIG_NAME} for it "
            f"({type(error).__name__}): check the name"
        ) from None
