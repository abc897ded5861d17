"""A strict double of Graphcore's `poptorch` (Poplar SDK 3.4: graphcore/poptorch at version.json 3.4.0), for testing
ipu_train/backends/poptorch.py where the SDK cannot be installed. `make_strict_poptorch()` returns a fresh
`types.ModuleType("poptorch")`.

It keeps PopTorch's names, signatures, argument checks, enums and error messages for what the backend uses, and the
errors that real PopTorch raises at wrapping, compilation and run time. Each rule cites where it comes from:
paths like `python/options.py` are in graphcore/poptorch, `popart: willow/...` in graphcore/popart. The device is
the host: the wrapped model runs on the CPU, once per micro-batch, with PopTorch's batching, gradient reduction,
optimizer updates and output modes.

One rule is the double's own, not a PopTorch error, and says so in its message (see `_check_mode`): PopTorch
compiles the model in whatever train/eval mode its shallow copy has when traced and never switches it
(python/__init__.py: trainingModel / inferenceModel notes), so a wrong mode silently trains without dropout or
evaluates with it; the double refuses a training model compiled in eval mode and an inference model compiled in
train mode (`check_modes=False` turns this off). The compiled mode then holds for every call, as on the device.

The machine: `ipus_in_system` IPUs (default: as many as the first model that attaches needs), so an inference model
cannot attach while the training one holds them (detachFromDevice first), as on a pod sized for the job.

PopRun instances: `make_strict_popdist()` returns a double of the SDK's `popdist` (with `popdist.poptorch.Options`)
for one instance of a poprun launch; its rules cite graphcore/poptorch (tests/popdist_test.py, python/__init__.py,
docs/user_guide/experimental.rst), graphcore/examples (nlp/bert/pytorch: args.py, ipu_options.py) and graphcore/tutorials
(feature_examples/pytorch/popdist/popdist_training.py); popdist's own source is not public. An executable of several
instances reduces its gradients over the instances' replicas on the IPUs (GCL); the double does it over the
torch.distributed group the test's processes start, and refuses to run several instances without one.

Not modelled: phased execution, batch_sampler, anchors, replica grouping, shuffling in a distributed DataLoader, the
PopART IR, fp16 numerics on device, tensor locations (recorded only)."""
import collections
import copy
import enum
import inspect
import logging
import math
import types

import torch
import torch.distributed as dist

logger = logging.getLogger("poptorch")

__version__ = "3.4.0"  # version.json
NO_EXECUTABLE_ERR = "Model has not been compiled or has been destroyed."  # python/_poplar_executor.py


# ----------------------------------------------------------------------------------------------------------- errors
class Error(Exception):
    """python/poptorch.cpp: Error (PyErr_NewException on Exception) with .message, .type, .location."""

    def __init__(self, message, error_type="poptorch_py_error", where=None):
        self.message, self.type, self.location = message, error_type, ""
        prefix = f"In {where}: " if where else ""
        super().__init__(f"{prefix}'{error_type}': {message}")


def _py_error(message):
    # python/_impl.py: createPoptorchError
    return Error(message)


def _cpp_error(message, where):
    # poptorch_err/source/ExceptionHandling.cpp: "In <file>:<line>: '<type>': <message>"
    return Error(message, "poptorch_cpp_error", where)


def _popart_error(message, where):
    # popart errors are rethrown by popart_compiler/source/Compiler.cpp: rethrowPopartOrPoplarException
    return Error(message, "popart_exception", where)


# ------------------------------------------------------------------------------------------------------------ enums
# python/enums.py: the same members and values.
class MeanReductionStrategy(enum.IntEnum):
    Running = 0
    Post = 1
    PostAndLoss = 2


class DataLoaderMode(enum.IntEnum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class SharingStrategy(enum.IntEnum):
    SharedMemory = 0
    FileSystem = 1
    Fork = 2
    ForkServer = 3


class OutputMode(enum.IntEnum):
    Final = 0
    EveryN = 1
    All = 2
    Sum = 3
    Default = 4


class ConnectionType(enum.IntEnum):
    Always = 0
    OnDemand = 1
    Never = 2


class ReductionType(enum.IntEnum):
    Sum = 0
    Mean = 1
    NoReduction = 2


class SyncPattern(enum.IntEnum):
    Full = 0
    SinglePipeline = 1
    ReplicaAndLadder = 2


class AutoStage(enum.IntEnum):
    SameAsIpu = 0
    AutoIncrement = 1


class CommGroupType(enum.IntEnum):
    All = 0
    Consecutive = 1
    Orthogonal = 2
    NoGrouping = 3


ENUMS = (MeanReductionStrategy, DataLoaderMode, SharingStrategy, OutputMode, ConnectionType, ReductionType,
         SyncPattern, AutoStage, CommGroupType)


# ---------------------------------------------------------------------------------------------------- OptionsDict
class OptionsDict:
    """python/_options_impl.py: OptionsDict — only keys given to the constructor can be set later, each only to a
    value of its default's type; reading an unknown attribute raises AttributeError("Invalid attribute X.");
    frozen once used by a wrapper or a DataLoader."""

    def __init__(self, **default_values):
        self._warnings_disabled = set()
        self._is_frozen = False
        self._values = default_values  # must be the last attribute set (as in the original)

    def set(self, **kwargs):
        self.checkIsFrozen()
        for option, value in kwargs.items():
            assert self.exists(option), ("Invalid option %s, valid options are %s") % (option, self._values.keys())
            assert isinstance(value, type(self._values[option])), (
                "Unexpected type %s for option %s. Expected %s" % (type(value), option, type(self._values[option])))
            self._values[option] = value

    def createOrSet(self, **kwargs):
        self.checkIsFrozen()
        for option, value in kwargs.items():
            if option in self._values:
                self.set(**{option: value})
            else:
                self._values[option] = value

    def exists(self, option):
        return option in self._values

    def deleteIfExists(self, option):
        if self.exists(option):
            del self._values[option]

    def _hasattr(self, option):
        if option == "__class__":
            return True
        if option.startswith("_"):
            return option in self.__dict__
        return self.exists(option)

    def _changeFreezeState(self, new_state):
        self.__dict__["_is_frozen"] = new_state
        for value in self.__dict__.values():
            if hasattr(type(value), "checkIsFrozen"):
                value.__dict__["_is_frozen"] = new_state
                if isinstance(value, OptionsDict):
                    value._changeFreezeState(new_state)

    def _freeze(self):
        self._changeFreezeState(True)

    def _unfreeze(self):
        self._changeFreezeState(False)

    def checkIsFrozen(self, option=None):
        if self._hasattr("_is_frozen") and option != "_is_frozen" and self.__dict__["_is_frozen"]:
            raise AttributeError("Can't modify frozen Options")

    def __deepcopy__(self, memory):
        copied = self.__class__.__new__(self.__class__)
        memory[id(self)] = copied
        for key, val in self.__dict__.items():
            copied.__dict__[key] = False if key == "_is_frozen" else copy.deepcopy(val, memory)
        return copied

    def __setattr__(self, option, value):
        self.checkIsFrozen(option)
        if option.startswith("_"):
            if self._hasattr("_values") and not self._hasattr(option):
                raise AttributeError(f"Invalid private attribute {option}. "
                                     f"Valid attributes: {list(self.__dict__.keys())}")
            object.__setattr__(self, option, value)
        else:
            self.set(**{option: value})

    def __getattr__(self, option):
        if not self._hasattr(option):
            raise AttributeError(f"Invalid attribute {option}.")
        if option.startswith("_"):
            return self.__dict__[option]
        return self.__dict__["_values"][option]

    def toDict(self):
        return dict(self._values)

    def __call__(self, option):
        return getattr(self, option)


# --------------------------------------------------------------------------------------------------------- Options
class _PopartOptions:
    """python/options.py: _PopartOptions — any key, any value (PopART checks them at compile time)."""

    def __init__(self):
        self._is_frozen = False
        self.options = {}
        self.set("instrumentWithHardwareCycleCounter", False)
        self.set("rearrangeAnchorsOnHost", False)

    def __deepcopy__(self, memory):
        copied = _PopartOptions()
        memory[id(self)] = copied
        for key, val in self.__dict__.items():
            setattr(copied, key, False if key == "_is_frozen" else copy.deepcopy(val, memory))
        return copied

    def checkIsFrozen(self, option=None):
        if self._is_frozen:
            raise AttributeError("Can't modify frozen Options")

    def set(self, key, value):
        self.checkIsFrozen()
        self.options[key] = value
        return self

    def setEngineOptions(self, engine_options):
        return self.set("engineOptions", engine_options)

    def setPatterns(self, patterns, level=2):
        assert isinstance(level, int)
        assert isinstance(patterns, dict)
        self.set("patterns_level", level)
        return self.set("patterns", patterns)


class _PrecisionOptions(OptionsDict):
    """python/options.py: _PrecisionOptions."""

    def __init__(self, popart_options):
        self._popart_options = popart_options
        super().__init__()

    def enableFloatingPointExceptions(self, enabled):
        assert isinstance(enabled, bool), "enableFloatingPointExceptions needs to be set to a bool"
        self._popart_options.set("enableFloatingPointChecks", enabled)
        return self

    def enableStochasticRounding(self, enabled):
        # python/options.py: _PrecisionOptions.enableStochasticRounding — no type check in the original
        self._popart_options.set("enableStochasticRounding", enabled)
        return self

    def setPartialsType(self, dtype):
        # python/options.py: _PrecisionOptions.setPartialsType — float or half only (message verbatim, no space)
        if dtype in [torch.float, torch.float32]:
            type_str = "float"
        elif dtype in [torch.half, torch.float16]:
            type_str = "half"
        else:
            raise ValueError("parameter to setPartialsType should be either" "torch.float or torch.half")
        self._popart_options.set("partialsTypeMatMuls", type_str)
        self._popart_options.set("convolutionOptions", {"partialsType": type_str})
        return self


class _TrainingOptions(OptionsDict):
    """python/options.py: _TrainingOptions."""

    def __init__(self, popart_options):
        self._popart_options = popart_options
        super().__init__(gradient_accumulation=1,
                         accumulation_and_replication_reduction_type=ReductionType.Mean,
                         meanAccumulationAndReplicationReductionStrategy=MeanReductionStrategy.Post)

    def gradientAccumulation(self, gradient_accumulation):
        # python/options.py: _TrainingOptions.gradientAccumulation — int only (OptionsDict.set type check)
        self.set(gradient_accumulation=gradient_accumulation)
        return self

    def _check_reduction_arg(self, reduction_type, name):
        # python/options.py: _TrainingOptions._check_reduction_arg — a ReductionType, not NoReduction
        if not isinstance(reduction_type, ReductionType) or reduction_type == ReductionType.NoReduction:
            raise ValueError(name + " must be set to poptorch.ReductionType.Mean or poptorch.ReductionType.Sum")

    def accumulationAndReplicationReductionType(self, reduction_type):
        self._check_reduction_arg(reduction_type, "accumulationAndReplicationReductionType")
        self.set(accumulation_and_replication_reduction_type=reduction_type)
        return self

    def setMeanAccumulationAndReplicationReductionStrategy(self, mean_reduction_strategy):
        # python/options.py: a MeanReductionStrategy only (OptionsDict.set type check)
        self.set(meanAccumulationAndReplicationReductionStrategy=mean_reduction_strategy)
        return self

    def setAutomaticLossScaling(self, enabled):
        # python/options.py: _TrainingOptions.setAutomaticLossScaling — no type check in the original
        self._popart_options.set("automaticLossScalingSettings.enabled", enabled)
        return self

    def setConvolutionDithering(self, enabled):
        self._popart_options.set("convolutionOptions", {"enableConvDithering": enabled})
        return self


class _DistributedOptions(OptionsDict):
    """python/options.py: _DistributedOptions (one process only in the double)."""

    def __init__(self):
        super().__init__(num_distributed_processes=1, distributed_process_id=0, ipuof_configs={})

    def configureProcessId(self, process_id, num_processes):
        self.set(distributed_process_id=process_id)
        self.set(num_distributed_processes=num_processes)
        return self

    @property
    def processId(self):
        return self.distributed_process_id

    @property
    def numProcesses(self):
        return self.num_distributed_processes


class TensorLocationSettings(OptionsDict):
    """python/options.py: TensorLocationSettings — booleans and ints checked with assert."""

    def minElementsForOffChip(self, min_elements):
        assert isinstance(min_elements, int)
        self.createOrSet(minElementsForOffChip=min_elements)
        return self

    def minElementsForReplicatedTensorSharding(self, min_elements):
        assert isinstance(min_elements, int)
        self.createOrSet(minElementsForReplicatedTensorSharding=min_elements)
        return self

    def useOnChipStorage(self, use=True):
        if use is None:
            self.deleteIfExists("onChip")
        else:
            assert isinstance(use, bool)
            self.createOrSet(onChip=int(use))
        return self

    def useReplicatedTensorSharding(self, use=True):
        assert isinstance(use, bool)
        self.createOrSet(useReplicatedTensorSharding=int(use))
        return self

    def useIOTilesToLoad(self, use=True):
        assert isinstance(use, bool)
        self.createOrSet(useIOTilesToLoad=int(use))
        return self

    def useIOTilesToStore(self, use=True):
        assert isinstance(use, bool)
        self.createOrSet(useIOTilesToStore=int(use))
        return self


class _TensorLocationOptions(OptionsDict):
    """python/options.py: _TensorLocationOptions — each setter asserts a TensorLocationSettings."""

    def numIOTiles(self, num_tiles):
        assert isinstance(num_tiles, int)
        err_msg = "numIOTiles must be an even number between 32 and 192."
        assert 32 <= num_tiles <= 192 and num_tiles % 2 == 0, err_msg
        self.createOrSet(numIOTiles=num_tiles)
        return self

    def _location(self, key, location):
        assert isinstance(location, TensorLocationSettings)
        self.createOrSet(**{key: location.toDict()})
        return self

    def setActivationLocation(self, location):
        return self._location("location_activation", location)

    def setWeightLocation(self, location):
        return self._location("location_weight", location)

    def setOptimizerLocation(self, location):
        return self._location("location_optimizer", location)

    def setAccumulatorLocation(self, location):
        return self._location("location_accumulator", location)


class _IExecutionStrategy:
    """python/options.py: _IExecutionStrategy."""

    def __init__(self, auto_stage, block_ids):
        self._auto_stage, self._block_ids = auto_stage, block_ids


class PipelinedExecution(_IExecutionStrategy):
    """python/options.py: PipelinedExecution(*args) — one AutoStage, or block ids (Stage objects not modelled);
    the default stage rule is AutoStage.SameAsIpu."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], AutoStage):
            super().__init__(args[0], {})
            return
        block_ids = {}
        for stage_id, arg in enumerate(args):
            names = [arg] if isinstance(arg, str) else list(arg)
            assert all(isinstance(name, str) for name in names)
            for name in names:
                assert name not in block_ids, f"{name} associated with more than one stage"
                block_ids[name] = stage_id
        super().__init__(AutoStage.SameAsIpu, block_ids)


class ShardedExecution(PipelinedExecution):
    """python/options.py: ShardedExecution — the same stage rules, execution_mode 1 (no pipelining)."""


class Options(OptionsDict):
    """python/options.py: Options — the methods the backend calls and their checks; anything else raises
    AttributeError("Invalid attribute X.") as the original's OptionsDict.__getattr__ does."""

    def __init__(self):
        self._popart = _PopartOptions()
        self._graphProcessing = _PrecisionOptions(self._popart)
        self._training = _TrainingOptions(self._popart)
        self._distributed = _DistributedOptions()
        self._tensor_locations = _TensorLocationOptions()
        self._execution_strategy = PipelinedExecution()
        self._relax_optimizer_checks = False
        self._show_compilation_progress_bar = True
        self._module_namescope_enabled = True
        super().__init__(replication_factor=1, input_group_size=1, input_cgt=CommGroupType.Consecutive,
                         broadcast_buffers=True, device_iterations=1, log_dir=".", max_repeat_logs=4,
                         auto_round_num_ipus=False, anchored_tensors={}, output_mode=OutputMode.Default.value,
                         output_return_period=1, connection_type=ConnectionType.Always.value,
                         sync_pattern=SyncPattern.Full.value, available_memory_proportion={})

    @property
    def TensorLocations(self):
        return self._tensor_locations

    @property
    def Distributed(self):
        return self._distributed

    @property
    def Precision(self):
        return self._graphProcessing

    @property
    def Training(self):
        return self._training

    @property
    def _Popart(self):
        return self._popart

    def autoRoundNumIPUs(self, auto_round_num_ipus=True):
        self.set(auto_round_num_ipus=auto_round_num_ipus)  # python/options.py: bool only (OptionsDict.set)
        return self

    def deviceIterations(self, device_iterations):
        self.set(device_iterations=device_iterations)  # python/options.py: int only (OptionsDict.set)
        return self

    def replicationFactor(self, replication_factor):
        self.set(replication_factor=replication_factor)  # python/options.py: int only (OptionsDict.set)
        return self

    def setExecutionStrategy(self, strategy):
        assert isinstance(strategy, _IExecutionStrategy)  # python/options.py: Options.setExecutionStrategy
        self._execution_strategy = strategy
        return self

    def setAvailableMemoryProportion(self, available_memory_proportion):
        # python/options.py: Options.setAvailableMemoryProportion — keys "IPU<n>"
        actual_memory = {}
        for key, mem in available_memory_proportion.items():
            assert key.startswith("IPU"), ("Available memory proportions are expected to be in a dictionary of "
                                           "{\"IPU0\": 0.5} where the 0 in IPU is the index of the IPU. "
                                           "Invalid key: %s" % key)
            actual_memory[int(key[3:])] = mem
        self.createOrSet(available_memory_proportion=actual_memory)
        return self

    def enableExecutableCaching(self, path):
        # python/options.py: Options.enableExecutableCaching — None disables
        if path is None:
            self._Popart.set("enableEngineCaching", False)
        else:
            self._Popart.set("cachePath", path)
            self._Popart.set("enableEngineCaching", True)
        return self

    def connectionType(self, connection_type):
        assert isinstance(connection_type, ConnectionType)  # python/options.py: Options.connectionType
        self.set(connection_type=connection_type.value)
        return self

    def syncPattern(self, sync_pattern):
        assert isinstance(sync_pattern, SyncPattern)
        self.set(sync_pattern=sync_pattern.value)
        return self

    def useIpuModel(self, use_model):
        self.createOrSet(use_model=use_model)
        return self

    def useOfflineIpuTarget(self, ipu_version=2):
        # python/options.py: Options.useOfflineIpuTarget — ConnectionType.Never
        self.connectionType(ConnectionType.Never)
        self.createOrSet(ipu_version=ipu_version)
        return self

    def outputMode(self, output_mode, output_return_period=None):
        # python/options.py: Options.outputMode — an OutputMode; EveryN needs a positive period
        assert isinstance(output_mode, OutputMode)
        if output_mode == OutputMode.EveryN:
            assert output_return_period and output_return_period > 0, (
                "EveryN anchor must have output_return_period set to valid positive integer")
        self.set(output_mode=output_mode.value, output_return_period=output_return_period or 1)
        return self

    def defaultOutputMode(self):
        return self.output_mode == OutputMode.Default

    def randomSeed(self, random_seed):
        # python/options.py: Options.randomSeed — int only, and it seeds the host RNG too
        assert isinstance(random_seed, int)
        torch.manual_seed(random_seed)
        self.createOrSet(random_seed=random_seed)
        return self

    def enableStableNorm(self, enabled):
        self._Popart.set("enableStableNorm", enabled)
        return self

    def enableSyntheticData(self, enabled):
        self._Popart.set("syntheticDataMode", 2 if enabled else 0)
        return self

    def logCycleCount(self, log_cycle_count):
        self._Popart.set("instrumentWithHardwareCycleCounter", log_cycle_count)
        return self

    def logDir(self, log_dir):
        self.set(log_dir=log_dir)
        return self

    def modelName(self, name):
        self.createOrSet(model_name=name)
        return self

    def showCompilationProgressBar(self, show=True):
        self._show_compilation_progress_bar = show
        return self

    def relaxOptimizerAttributesChecks(self, relax=True):
        self._relax_optimizer_checks = relax
        return self

    def updatableNamedBuffers(self, buffers):
        self._Popart.set("updatableNamedBuffers", buffers)
        return self

    def clone(self):
        return copy.deepcopy(self)


# --------------------------------------------------------------------------------------------------------- blocks
class _StageManager:
    """The IPU switches of one trace. python/options.py: _DefaultStageManager.getStage (stage ids) and
    python/_options_impl.py: IStageManager.beginStage (which IPU); popart_compiler/source/Compiler.cpp:
    Compiler::setActiveIpu counts a switch each time the IPU differs from the last one (which starts at 0)."""

    def __init__(self, strategy):
        self._strategy = strategy
        self._stages, self._next_id, self._next_auto_id = {}, 1, 0
        self.switches, self.last_ipu, self.used_ipus, self.current_ipu = 0, 0, set(), 0

    def next_auto_id(self):
        self._next_auto_id += 1
        return str(self._next_auto_id - 1)

    def _stage_id(self, block_id, ipu_id):
        if self._strategy._block_ids:
            assert block_id in self._strategy._block_ids, (
                f"Unknown Block '{block_id}' list of expected Blocks: {list(self._strategy._block_ids)}")
            return self._strategy._block_ids[block_id]
        if block_id not in self._stages:
            if self._strategy._auto_stage == AutoStage.SameAsIpu:
                assert ipu_id is not None, (f"poptorch.AutoStage.SameAsIpu was selected but no IPU was specified "
                                            f"for block {block_id}")
                self._stages[block_id] = ipu_id
            else:
                self._stages[block_id] = self._next_id
                self._next_id += 1
        return self._stages[block_id]

    def begin_stage(self, user_id, ipu_id):
        user_id = user_id or self.next_auto_id()
        stage_id = self._stage_id(user_id, ipu_id)
        ipu = ipu_id if ipu_id is not None else stage_id
        if ipu != self.last_ipu:
            self.switches += 1
        self.last_ipu = self.current_ipu = ipu
        self.used_ipus.add(ipu)


class _BlockHook:
    """python/ops.py: _BlockHook — a forward pre-hook that starts the block while a model is being traced."""

    def __init__(self, state, user_id, ipu_id):
        self._state, self._user_id, self._ipu_id = state, user_id, ipu_id

    def __call__(self, module, inputs):
        manager = self._state.stage_manager
        if manager is not None:
            if self._user_id is None:
                self._user_id = manager.next_auto_id()
            manager.begin_stage(self._user_id, self._ipu_id)

    def __repr__(self):
        return f"BeginBlock(user_id={self._user_id}, ipu_id={self._ipu_id})"


def _make_blocks(state):
    def BeginBlock(layer_to_call, user_id=None, ipu_id=None):
        """python/ops.py: BeginBlock(layer_to_call, user_id=None, ipu_id=None)."""
        if not isinstance(layer_to_call, torch.nn.Module):
            if callable(layer_to_call):  # python/ops.py: the legacy function form is still accepted
                return _LegacyBeginBlockFn(state, layer_to_call, user_id, ipu_id)
            raise _py_error("module is not an instance of torch.nn.Module or function.")
        # python/ops.py: BeginBlock — a module is placed in one block only
        if any(isinstance(hook, _BlockHook) for hook in layer_to_call._forward_pre_hooks.values()):
            raise _py_error("module has already been assigned to a block.")
        layer_to_call.register_forward_pre_hook(_BlockHook(state, user_id, ipu_id))
        return layer_to_call

    def removeBlocks(module):
        """python/ops.py: removeBlocks."""
        assert isinstance(module, torch.nn.Module)
        for m in module.modules():
            m._forward_pre_hooks = collections.OrderedDict(
                (k, v) for k, v in m._forward_pre_hooks.items() if not isinstance(v, _BlockHook))

    class Block(torch.nn.Module):
        """python/ops.py: Block(user_id=None, ipu_id=None), a context manager."""

        def __init__(self, user_id=None, ipu_id=None):
            super().__init__()
            self._user_id, self._ipu_id = user_id, ipu_id

        @staticmethod
        def useAutoId():
            if state.stage_manager is not None:
                state.stage_manager._next_auto_id = 0

        @staticmethod
        def start(user_id=None, ipu_id=None):
            if state.stage_manager is not None:
                state.stage_manager.begin_stage(user_id, ipu_id)

        def __enter__(self):
            Block.start(self._user_id, self._ipu_id)

        def __exit__(self, *exc):
            return None

    return BeginBlock, removeBlocks, Block


class _LegacyBeginBlockFn(torch.nn.Module):
    """python/ops.py: LegacyBeginBlockFn."""

    def __init__(self, state, layer_to_call, user_id=None, ipu_id=None):
        super().__init__()
        self._state, self._layer_to_call, self._user_id, self._ipu_id = state, layer_to_call, user_id, ipu_id

    def __call__(self, *args, **kwargs):
        manager = self._state.stage_manager
        if manager is not None:
            manager.begin_stage(self._user_id or manager.next_auto_id(), self._ipu_id)
        return self._layer_to_call(*args, **kwargs)


def recomputationCheckpoint(*tensors):
    """python/ops.py: recomputationCheckpoint(*tensors) — tensors only; one in, one out; a list or tuple in, the
    same type out. On the host it is the identity."""
    if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
        return type(tensors[0])(recomputationCheckpoint(*tensors[0]))
    out = []
    for t_in in tensors:
        if not isinstance(t_in, torch.Tensor):
            raise ValueError("All inputs must be tensors")
        out.append(t_in)
    return out[0] if len(out) == 1 else tuple(out)


# ---------------------------------------------------------------------------------------------------------- losses
# The torch losses PopTorch lowers to popart::identityloss: poptorch/source/popart_canonicalization/LossOps.cpp
# (registration) and scripts/PopAtenHandlers.py (loss handlers).
LOSS_FUNCTIONS = ("cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
                  "poisson_nll_loss", "multilabel_soft_margin_loss", "cosine_embedding_loss", "triplet_margin_loss",
                  "ctc_loss", "hinge_embedding_loss", "l1_loss", "margin_ranking_loss", "mse_loss", "smooth_l1_loss",
                  "soft_margin_loss")


class _LossTracer:
    """Records the loss tensors of one forward pass: torch's loss functions and poptorch.identity_loss."""

    def __init__(self, state):
        self._state, self.losses, self._saved, self._depth = state, [], {}, 0

    def __enter__(self):
        functional = torch.nn.functional
        for name in LOSS_FUNCTIONS:
            self._saved[name] = getattr(functional, name)
            setattr(functional, name, self._recording(self._saved[name]))
        self._state.loss_tracer = self
        return self

    def __exit__(self, *exc):
        for name, function in self._saved.items():
            setattr(torch.nn.functional, name, function)
        self._state.loss_tracer = None

    def _recording(self, function):
        def loss(*args, **kwargs):
            self._depth += 1
            try:
                out = function(*args, **kwargs)
            finally:
                self._depth -= 1
            if self._depth == 0:
                self.record(out)
            return out
        return loss

    def record(self, tensor):
        self.losses.append(tensor)

    def final_loss(self, where):
        """poptorch/source/RemoveSurplusIdentityLosses.cpp: removeSurplusIdentityLosses — a loss used by a later
        loss is folded into it; exactly one independent loss must remain."""
        if not self.losses:
            raise _cpp_error("Couldn't find a loss in graph!", where)
        independent = [loss for loss in self.losses if not any(
            other is not loss and _feeds(loss, other) for other in self.losses)]
        if len(independent) != 1:
            raise _cpp_error("Multiple independent losses found in graph. Graph must have one final loss. "
                             "Wrap final graph loss in poptorch.identity_loss.", where)
        return independent[0]


def _feeds(loss, other):
    """Whether `loss` is an input of `other` (its autograd node is reachable from other's)."""
    target, start = loss.grad_fn, other.grad_fn
    if target is None or start is None or target is start:
        return False
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _make_identity_loss(state):
    def identity_loss(x, reduction):
        """python/ops.py: identity_loss(x, reduction) — "sum", "mean" or "none"; marks x as the loss."""
        if reduction == "sum":
            out = x.sum()
        elif reduction == "mean":
            out = x.mean()
        else:
            assert reduction == "none", "Unsupported reduction type!"
            out = x.view_as(x)  # a node of its own, as the identityloss op is
        if state.loss_tracer is not None:
            state.loss_tracer.record(out)
        return out
    return identity_loss


# ------------------------------------------------------------------------------------------------------ optimizers
class Optimizer:
    """python/optim.py: Optimizer — the IPU state flags every PopTorch optimizer carries."""

    def __init__(self):
        self._state_dict = {"ipu_state": None, "ipu_param": None}
        self.ipu_state_is_dirty = False
        self.host_state_is_dirty = False

    def has_state(self):
        return self._state_dict.get("ipu_state") is not None and self._state_dict.get("ipu_param") is not None


ACCUM_TYPES = (torch.float16, torch.float32)
ACCUM_ERROR = "Accumulation types must be either torch.float32 or torch.float16"  # python/optim.py


def _parent_args(arguments, child_only):
    """python/optim.py: _parseArgs — the arguments given (not None) that are not PopTorch's own go to torch."""
    return {k: v for k, v in arguments.items() if v is not None and k not in child_only and k != "self"}


def _check_accum_types(*types_, message=ACCUM_ERROR):
    for dtype in types_:
        assert dtype in ACCUM_TYPES, message


class SGD(Optimizer, torch.optim.SGD):
    """python/optim.py: SGD — torch 2.0.1's arguments, then loss_scaling, velocity_scaling, use_combined_accum,
    accum_type, velocity_accum_type, max_grad_norm."""
    _child_only = ["loss_scaling", "velocity_scaling", "use_combined_accum", "accum_type", "velocity_accum_type",
                   "max_grad_norm"]

    def __init__(self, params, lr, momentum=None, dampening=None, weight_decay=None, nesterov=None, maximize=None,
                 foreach=None, differentiable=None, loss_scaling=None, velocity_scaling=None,
                 use_combined_accum=None, accum_type=None, velocity_accum_type=None, max_grad_norm=None):
        parent = _parent_args(locals(), SGD._child_only)
        Optimizer.__init__(self)
        torch.optim.SGD.__init__(self, **parent)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.use_combined_accum = bool(use_combined_accum)
        self.accum_type = torch.float32 if accum_type is None else accum_type
        self.velocity_accum_type = torch.float32 if velocity_accum_type is None else velocity_accum_type
        _check_accum_types(self.accum_type, self.velocity_accum_type)
        self.max_grad_norm = float("Inf") if max_grad_norm is None else max_grad_norm


class Adam(Optimizer, torch.optim.Adam):
    """python/optim.py: Adam — torch 2.0.1's arguments, then loss_scaling, accum_type, the two momentum accum
    types, max_grad_norm."""
    _child_only = ["loss_scaling", "accum_type", "first_order_momentum_accum_type",
                   "second_order_momentum_accum_type", "max_grad_norm"]

    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, foreach=None,
                 maximize=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                 accum_type=None, first_order_momentum_accum_type=None, second_order_momentum_accum_type=None,
                 max_grad_norm=None):
        parent = _parent_args(locals(), Adam._child_only)
        Optimizer.__init__(self)
        torch.optim.Adam.__init__(self, **parent)
        _set_adam_attributes(self, loss_scaling, accum_type, first_order_momentum_accum_type,
                             second_order_momentum_accum_type, max_grad_norm)


class AdamW(Optimizer, torch.optim.AdamW):
    """python/optim.py: AdamW — torch 2.0.1's arguments, then loss_scaling, bias_correction, accum_type, the two
    momentum accum types, max_grad_norm."""
    _child_only = ["loss_scaling", "bias_correction", "accum_type", "first_order_momentum_accum_type",
                   "second_order_momentum_accum_type", "max_grad_norm"]

    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, maximize=None,
                 foreach=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                 bias_correction=None, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None, max_grad_norm=None):
        parent = _parent_args(locals(), AdamW._child_only)
        Optimizer.__init__(self)
        torch.optim.AdamW.__init__(self, **parent)
        self.bias_correction = True if bias_correction is None else bias_correction
        _set_adam_attributes(self, loss_scaling, accum_type, first_order_momentum_accum_type,
                             second_order_momentum_accum_type, max_grad_norm)


def _set_adam_attributes(optimizer, loss_scaling, accum_type, first, second, max_grad_norm):
    optimizer.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
    optimizer.accum_type = torch.float32 if accum_type is None else accum_type
    optimizer.first_order_momentum_accum_type = torch.float32 if first is None else first
    optimizer.second_order_momentum_accum_type = torch.float32 if second is None else second
    _check_accum_types(optimizer.accum_type, optimizer.first_order_momentum_accum_type,
                       optimizer.second_order_momentum_accum_type)
    optimizer.max_grad_norm = float("Inf") if max_grad_norm is None else max_grad_norm


class RMSprop(Optimizer, torch.optim.RMSprop):
    """python/optim.py: RMSprop — torch 2.0.1's arguments, then loss_scaling, accum_type, the two momentum accum
    types, use_tf_variant; no max_grad_norm."""
    _child_only = ["loss_scaling", "accum_type", "first_order_momentum_accum_type",
                   "second_order_momentum_accum_type", "use_tf_variant"]

    def __init__(self, params, lr=None, alpha=None, eps=None, weight_decay=None, momentum=None, centered=None,
                 foreach=None, maximize=None, differentiable=None, loss_scaling=None, accum_type=None,
                 first_order_momentum_accum_type=None, second_order_momentum_accum_type=None,
                 use_tf_variant=None):
        parent = _parent_args(locals(), RMSprop._child_only)
        Optimizer.__init__(self)
        torch.optim.RMSprop.__init__(self, **parent)
        _set_adam_attributes(self, loss_scaling, accum_type, first_order_momentum_accum_type,
                             second_order_momentum_accum_type, None)
        del self.max_grad_norm  # RMSprop does not clip
        self.use_tf_variant = bool(use_tf_variant)


class LAMB(Optimizer, torch.optim.Optimizer):
    """python/optim.py: LAMB(params, lr, betas, eps, weight_decay, bias_correction, loss_scaling, max_weight_norm,
    accum_type, first/second_order_momentum_accum_type) — no max_grad_norm; its step is the original's."""

    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, bias_correction=None,
                 loss_scaling=None, max_weight_norm=None, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None):
        defaults = dict(lr=1e-3 if lr is None else lr, betas=(0.9, 0.999) if betas is None else betas,
                        eps=1e-8 if eps is None else eps, weight_decay=1e-2 if weight_decay is None else weight_decay,
                        max_weight_norm=65500.0 if max_weight_norm is None else max_weight_norm)
        Optimizer.__init__(self)
        torch.optim.Optimizer.__init__(self, params, defaults)
        accum_types = [torch.float32 if t is None else t
                       for t in (accum_type, first_order_momentum_accum_type, second_order_momentum_accum_type)]
        # python/optim.py: LAMB's message is a triple-quoted string
        _check_accum_types(*accum_types, message="""Accumulation types must be either torch.float32
                or torch.float16""")
        self.bias_correction = True if bias_correction is None else bias_correction
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.max_weight_norm = defaults["max_weight_norm"]
        (self.accum_type, self.first_order_momentum_accum_type,
         self.second_order_momentum_accum_type) = accum_types

    @torch.no_grad()
    def step(self, closure=None):
        """python/optim.py: LAMB.step."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p)
        return loss

    def _update(self, group, p):
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        correction1 = 1 - beta1 ** state["step"] if self.bias_correction else 1
        correction2 = 1 - beta2 ** state["step"] if self.bias_correction else 1
        state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(correction2)).add_(group["eps"])
        update = state["exp_avg"] / correction1 / denom + group["weight_decay"] * p
        weight_norm = p.pow(2).sum().sqrt().clamp(max=self.max_weight_norm)
        update_norm = update.pow(2).sum().sqrt()
        trust = 1.0 if weight_norm == 0 or update_norm == 0 else weight_norm / update_norm
        p.add_(update, alpha=-group["lr"] * float(trust))


SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, LAMB)


def _check_optimizer_type(optimizer):
    # python/_optimizer_attributes.py: _toPoptorchOptimizer / convertOptimizerToDict — torch's SGD, Adam, AdamW,
    # RMSprop or PopTorch's optimizers only
    assert isinstance(optimizer, SUPPORTED_OPTIMIZERS), (
        "Unsupported optimizer type. Types supported %s" % ", ".join(
            ["_OptimizerType.SGD1", "_OptimizerType.SGD2", "_OptimizerType.ADAM", "_OptimizerType.ADAMW",
             "_OptimizerType.ADAMW_NO_BIAS", "_OptimizerType.RMSPROP", "_OptimizerType.RMSPROP_CENTERED",
             "_OptimizerType.LAMB", "_OptimizerType.LAMB_NO_BIAS"]))


def _group_values(optimizer):
    return [{k: copy.copy(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


# ---------------------------------------------------------------------------------------------------------- device
class _System:
    """The IPUs of the machine. popart_compiler/source/CompilerImpl.cpp: createDevice acquires
    max(used IPUs, highest IPU id + 1) x replicas, rounded up to a power of two (popart_compiler/source/Utils.cpp:
    roundUpNumIPUs), and fails when they are not free. `ipus=None`: the machine is as large as the first model
    that attaches (a pod sized for the training job, as the configurations in ipu_configs are)."""

    def __init__(self, ipus):
        self.ipus, self.held = ipus, {}

    def free(self):
        return self.ipus - sum(self.held.values())

    def check(self, owner, count):
        if self.ipus is None:
            return
        if count > self.free() and owner not in self.held:
            extra = (f"\nNo device found on the system with {count} IPUs: the configuration needs changing"
                     if count > self.ipus else "")  # CompilerImpl.cpp: checkSystemConfig
            raise _cpp_error(f"Failed to acquire {count} IPU(s){extra}", "popart_compiler/source/CompilerImpl.cpp")

    def acquire(self, owner, count):
        if self.ipus is None:
            self.ipus = count
        self.check(owner, count)
        self.held[owner] = count

    def release(self, owner):
        self.held.pop(owner, None)


def _ipus_needed(options, used_ipus):
    """popart_compiler/source/CompilerImpl.cpp: CompilerImpl::createDevice."""
    where = "popart_compiler/source/CompilerImpl.cpp"
    count = max(len(used_ipus), max(used_ipus) + 1) * options.replication_factor
    if count > 64:  # CompilerImpl.cpp: assertSingleInstanceMaxNumIPUs
        raise _cpp_error(f"Too many IPUs requested ({count}). Experiments that need more than 64 IPUs require "
                         "distributed execution.", where)
    rounded = 1
    while rounded < count:
        rounded *= 2
    if rounded != count and options.connection_type != ConnectionType.Never:
        common = ", because PopTorch must reserve a power of 2 or maximum of 64 IPUs per process"
        if not options.auto_round_num_ipus:
            raise _cpp_error(f"The model specifies the use of {count} IPUs, however PopTorch must reserve a minimum "
                             f"of {rounded} in order to allow the model to run{common}. Please reconfigure your "
                             "model to use a different number of IPUs or set "
                             "poptorch.Options().autoRoundNumIPUs(True).", where)
        count = rounded
    return count


# -------------------------------------------------------------------------------------------------------- executor
class _Trace:
    """What compiling saw: the stage manager's IPU switches, which IPUs each parameter was used on, the train/eval
    mode of every module, and the inputs (full size) the executable was compiled for."""

    def __init__(self, stage_manager, params_on_ipus, modes, inputs):
        self.stage_manager, self.params_on_ipus, self.modes, self.inputs = (stage_manager, params_on_ipus, modes,
                                                                            inputs)


def _combined_factor(options):
    # python/_poplar_executor.py: PoplarExecutor._narrow_tensor
    return (options.device_iterations * (options.replication_factor // options.input_group_size)
            * options.Training.gradient_accumulation)


def _check_batch_dimension(name, tensor, options):
    """python/_poplar_executor.py: PoplarExecutor._narrow_tensor — the batch dimension is a multiple of device
    iterations x replicas x gradient accumulation (1 for inference: the inference options refuse any other)."""
    factor = _combined_factor(options)
    b_size = 1 if not tensor.size() else tensor.size()[0]
    assert b_size % factor == 0, (
        "Invalid batch dimension: In the input %s, the batch dimension (%d) must be a multiple of "
        "Options.deviceIterations(%d) * (Options.replicationFactor(%d) / "
        "Options.inputReplicaGrouping.input_group_size(%d)) * Options.Training.gradientAccumulation(%d) = %d "
        "because it is used to calculate the batch size which will be executed on the device in any given "
        "iteration. For a full explanation see the batching semantics page of the documentation."
    ) % (tensor.shape, b_size, options.device_iterations, options.replication_factor, options.input_group_size,
         options.Training.gradient_accumulation, factor)


def _bind_inputs(model, args, kwargs):
    """python/_args_parser.py: ArgsParser.__call__ — the forward's parameters by name, defaults filled in."""
    signature = inspect.signature(model.forward)
    names = [n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values())
    assert variadic or len(args) + len(kwargs) <= len(names), (
        "Too many arguments provided: expected %s (%d) but got %d" % (names, len(names), len(args) + len(kwargs)))
    if not variadic:
        for k in kwargs:
            assert k in names, f"{k} is not a valid parameter.Allowed values are {names}"
    bound = collections.OrderedDict(zip(names, args))
    for name in names[len(args):]:
        if name in kwargs:
            bound[name] = kwargs[name]
        elif signature.parameters[name].default is inspect.Parameter.empty:
            raise _py_error(f"Mandatory parameter {name} missing")
        else:
            bound[name] = signature.parameters[name].default
    return bound


def _validate_inputs(compiled, inputs):
    """python/_args_parser.py: Args.validateInputs — the same types, dtypes and shapes as at compile time."""
    end = ("\nThis error occurred because the inputs passed at runtime don't match the inputs used to compile the "
           "model.\nTo recompile the model for the new inputs create a new inferenceModel / trainingModel wrapper "
           "or call destroy() on the curent one and try again.")
    for name, expected in compiled.items():
        given = inputs[name]
        if type(expected) is not type(given):
            raise _py_error(f"Type mismatch for {name}: expected {type(expected)} but got {type(given)}.{end}")
        if isinstance(expected, torch.Tensor):
            if expected.dtype != given.dtype:
                raise _py_error(f"Data type mismatch for {name}: expected {expected.dtype} but got "
                                f"{given.dtype}.{end}")
            if expected.shape != given.shape:
                raise _py_error(f"Shape mismatch for {name}: expected {expected.shape} but got {given.shape}.{end}")
        elif not isinstance(expected, (dict, list, tuple)) and expected != given:
            raise _py_error(f"Value mismatch for {name}: expected {expected} but got {given}.{end}")


def _micro_batches(inputs, options):
    """The combined batch cut into micro-batches in PopART's input order [device iterations, gradient accumulation,
    replicas, micro-batch] (PopART user guide: data input shape): a list per device iteration."""
    iterations = options.device_iterations
    per_iteration = _combined_factor(options) // iterations
    count = iterations * per_iteration
    pieces = [collections.OrderedDict() for _ in range(count)]
    for name, value in inputs.items():
        chunks = value.chunk(count) if isinstance(value, torch.Tensor) and value.dim() else [value] * count
        for piece, chunk in zip(pieces, chunks):
            piece[name] = chunk
    return [pieces[i * per_iteration:(i + 1) * per_iteration] for i in range(iterations)]


def _flatten(structure):
    if isinstance(structure, dict):
        return [t for v in structure.values() for t in _flatten(v)]
    if isinstance(structure, (list, tuple)):
        return [t for v in structure for t in _flatten(v)]
    return [structure] if isinstance(structure, torch.Tensor) else []


def _rebuild(structure, values):
    """python/_utils.py: reconstructTensorStructure — the model's output structure, the device's tensors."""
    if isinstance(structure, dict):
        out = copy.copy(structure)
        for key, value in structure.items():
            out[key] = _rebuild(value, values)
        return out
    if isinstance(structure, (list, tuple)):
        items = [_rebuild(v, values) for v in structure]
        return type(structure)(*items) if hasattr(structure, "_fields") else type(structure)(items)
    return next(values) if isinstance(structure, torch.Tensor) else structure


def _host_dtype(tensor):
    # python/_poplar_executor.py: _compileWithDispatch — long outputs come back as int, double as float
    tensor = tensor.detach()
    if tensor.dtype == torch.long:
        return tensor.int()
    return tensor.float() if tensor.dtype == torch.double else tensor


def _join(tensors):
    return torch.stack(tensors) if tensors[0].dim() == 0 else torch.cat(tensors)


def _per_replica(outputs, replicas, pick):
    """One result per replica (replicas concatenated, as python tests/replicated_graph_test.py shows)."""
    results = [pick([o for k, o in enumerate(outputs) if k % replicas == r]) for r in range(replicas)]
    return results[0] if replicas == 1 else _join(results)


def _gather_outputs(per_micro, options):
    """python/enums.py: OutputMode and docs/user_guide/batching.rst (outputMode): All — every micro-batch; Final —
    the last; Sum — their sum; EveryN — the last micro-batch of every N-th device iteration (results of several
    micro-batches are concatenated along the batch dimension, scalars stacked)."""
    mode, replicas = OutputMode(options.output_mode), options.replication_factor
    flat = [[_host_dtype(t) for t in _flatten(out)] for out in per_micro]
    columns = list(zip(*flat))
    if mode == OutputMode.All:
        values = [_join(list(c)) for c in columns]
    elif mode == OutputMode.Final:
        values = [_per_replica(list(c)[-replicas:], replicas, lambda xs: xs[-1]) for c in columns]
    elif mode == OutputMode.Sum:
        values = [_per_replica(list(c), replicas, lambda xs: torch.stack(xs).sum(0)) for c in columns]
    else:
        per_iteration = len(per_micro) // options.device_iterations
        period = options.output_return_period
        values = [_join([c[(i + 1) * per_iteration - 1] for i in range(options.device_iterations)
                         if (i + 1) % period == 0]) for c in columns]
    return _rebuild(per_micro[-1], iter(values))


def _backward_error():
    raise _py_error("backward() cannot be called explicitly on outputs of a PopTorch model. If you're using a "
                    "trainingModel, the backwards pass is performed automatically when invoking the model. If "
                    "you're using an inferenceModel, you should use a trainingModel instead.")


def _check_mode(model, training, check_modes):
    """The double's own rule (PopTorch raises nothing): python/__init__.py: trainingModel / inferenceModel notes and
    docs/user_guide/overview.rst (Model wrapping functions) — PopTorch traces a shallow copy in the mode it has and
    never calls train() or eval(), so the user must set it before the model is compiled."""
    if check_modes and model.training != training:
        wanted, found = ("train", "eval") if training else ("eval", "train")
        kind = "trainingModel" if training else "inferenceModel"
        raise _py_error(f"[strict double, not a PopTorch error] poptorch.{kind} compiled a model in {found} mode: "
                        f"PopTorch does not switch modes, so the executable would run in {found} mode; call "
                        f"model.{wanted}() before wrapping (python/__init__.py: {kind} note)")


def _make_executor(state):
    class PoplarExecutor:
        """python/_poplar_executor.py: PoplarExecutor — the wrapper trainingModel and inferenceModel return."""

        def __init__(self, model, options, training, poptorch_version, optimizer=None, user_model=None):
            options = self._own_options(options)
            self._user_model = user_model or model
            self._model, self._training, self._options = model, training, options
            self._executable, self._trace, self._is_attached = None, None, False
            self._optimizer, self._device_groups = None, None
            self._prepare(options, optimizer)
            self._options._freeze()
            state.executors.append(self)

        @staticmethod
        def _own_options(options):
            # python/_poplar_executor.py: PoplarExecutor.__init__ — a poptorch.Options, frozen, then cloned
            if not options:
                return Options()
            if not isinstance(options, Options):
                raise _py_error(f"Invalid type: 'options' is of type {type(options)} (Expected poptorch.Options)")
            options._freeze()
            return options.clone()

        def _prepare(self, options, optimizer):
            if self._training:
                if options.defaultOutputMode():  # training returns the final result by default
                    options.outputMode(OutputMode.Final)
                self.setOptimizer(optimizer or SGD(self._user_model.parameters(), lr=0.01))
                _wrap_user_model(state, self)
                return
            if options.defaultOutputMode():  # inference returns every result by default
                options.outputMode(OutputMode.All)
            if options.Training.gradient_accumulation != 1:
                # python/_poplar_executor.py: PoplarExecutor.__init__ — inference needs gradientAccumulation 1
                message = ("You must set poptorch.Options().Training.gradientAccumulation to 1 or leave it as its "
                           "default value (1) when running a poptorch.inferenceModel().")
                strategy = options._execution_strategy
                if isinstance(strategy, PipelinedExecution) and not isinstance(strategy, ShardedExecution):
                    message += (" Use poptorch.Options().deviceIterations to process a sufficient number of "
                                "batches each run for pipelined execution instead.")
                raise _py_error(message)
            assert not optimizer, "Optimizer should be None for inference"

        # -- the wrapped model
        @property
        def model(self):
            return self._user_model

        @property
        def options(self):
            return self._options

        @property
        def training(self):
            return self._training

        def __getattr__(self, attr):
            # python/_poplar_executor.py: PoplarExecutor.__getattr__ — the wrapped model's attributes
            if "_user_model" not in self.__dict__:
                raise AttributeError(attr)
            return getattr(self.__dict__["_user_model"], attr)

        # -- optimizer
        def setOptimizer(self, optimizer):
            """python/_poplar_executor.py: PoplarExecutor.setOptimizer — the device takes the optimizer's values
            now (a learning-rate change reaches the IPU only through setOptimizer)."""
            _check_optimizer_type(optimizer)
            self._check_running_strategy(optimizer)
            self._optimizer = optimizer
            self._device_groups = _group_values(optimizer)

        def _check_running_strategy(self, optimizer):
            # python/_optimizer_attributes.py: convertOptimizerToDict — fp16 accumulation needs the Running mean
            # reduction strategy, which can no longer change once compiled
            if getattr(optimizer, "accum_type", None) != torch.float16 or getattr(optimizer, "use_combined_accum",
                                                                                  False):
                return
            training = self._options.Training
            if not self.isCompiled():
                self._options._unfreeze()
                training.setMeanAccumulationAndReplicationReductionStrategy(MeanReductionStrategy.Running)
                self._options._freeze()
            elif training.meanAccumulationAndReplicationReductionStrategy != MeanReductionStrategy.Running:
                raise ValueError("Invalid optimizer: the new optimizer would require changing options.Training."
                                 "meanAccumulationAndReplicationReductionStrategy to "
                                 "poptorch.MeanReductionStrategy.Running but the executable is already compiled.")

        # -- compilation
        def compile(self, *args, **kwargs):
            """python/_poplar_executor.py: PoplarExecutor.compile."""
            inputs = _bind_inputs(self._model, args, kwargs)
            if self._executable is not None:
                logger.warning("Call to compile() ignored: the executable is already compiled")
                return
            self._compile(inputs)

        def _compile(self, inputs):
            for name, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    _check_batch_dimension(name, value, self._options)
            micro = _micro_batches(inputs, self._options)[0][0]
            _check_mode(self._model, self._training, state.check_modes)
            trace = self._traced(micro, inputs)
            needed = _ipus_needed(self._options, trace.stage_manager.used_ipus or {0})
            if self._options.connection_type != ConnectionType.Never:
                state.system.check(self, needed)  # createDevice comes before the pipeline checks
            _check_pipeline_depth(self._options, trace.stage_manager, self._training)
            _check_shared_weights(self._options, trace, self._model)
            self._trace, self._executable, self._ipus = trace, object(), needed
            if self._options.connection_type != ConnectionType.Never:
                state.system.acquire(self, needed)
                self._is_attached = True

        def _traced(self, micro, inputs):
            """Runs the model once on one micro-batch, as PopTorch's dispatcher traces it."""
            manager = _StageManager(self._options._execution_strategy)
            params_on_ipus = collections.defaultdict(set)

            def record(module, args, output):
                for param in module.parameters(recurse=False):
                    params_on_ipus[id(param)].add(manager.current_ipu)

            modes = {m: m.training for m in self._model.modules()}
            handle = torch.nn.modules.module.register_module_forward_hook(record)
            state.stage_manager = manager
            try:
                with _LossTracer(state) as tracer:
                    with torch.enable_grad() if self._training else torch.no_grad():
                        self._model(**micro)
                if self._training:
                    tracer.final_loss("poptorch/source/RemoveSurplusIdentityLosses.cpp")
            finally:
                state.stage_manager = None
                handle.remove()
            return _Trace(manager, params_on_ipus, modes, inputs)

        # -- running
        def __call__(self, *args, **kwargs):
            """python/_poplar_executor.py: PoplarExecutor.__call__."""
            assert self._options.connection_type != ConnectionType.Never, (
                "Trying to run a model on an offline device (ConnectionType.Never): use model.compile(inputs) "
                "instead of model(inputs)")
            inputs = _bind_inputs(self._model, args, kwargs)
            if not self.isCompiled():
                self._compile(inputs)
            if not self._is_attached:
                self.attachToDevice()
            _validate_inputs(self._trace.inputs, inputs)
            with _modes(self._trace.modes):
                per_micro = self._run(_micro_batches(inputs, self._options))
            outputs = _gather_outputs(per_micro, self._options)
            for tensor in _flatten(outputs):
                tensor.backward = _backward_error
            return outputs

        def _run(self, iterations):
            if not self._training:
                with torch.no_grad():
                    return [self._model(**micro) for step in iterations for micro in step]
            return [out for step in iterations for out in self._train_step(step)]

        def _train_step(self, micro_batches):
            """One device iteration: gradients of the micro-batches reduced by the options' reduction type
            (python/options.py: accumulationAndReplicationReductionType), then one optimizer update with the
            values of the last setOptimizer."""
            optimizer, outputs = self._optimizer, []
            optimizer.zero_grad()
            mean = self._options.Training.accumulation_and_replication_reduction_type == ReductionType.Mean
            for micro in micro_batches:
                with _LossTracer(state) as tracer:
                    out = self._model(**micro)
                loss = tracer.final_loss("poptorch/source/RemoveSurplusIdentityLosses.cpp")
                (loss / len(micro_batches) if mean else loss).backward()
                outputs.append(out)
            _reduce_over_instances(optimizer, self._options, mean)
            max_norm = getattr(optimizer, "max_grad_norm", float("Inf"))
            if math.isfinite(max_norm):
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
            with _device_values(optimizer, self._device_groups):
                optimizer.step()
            return outputs

        # -- device
        def isCompiled(self):
            return bool(self._executable)

        def isAttachedToDevice(self):
            return self.isCompiled() and self._is_attached

        def detachFromDevice(self):
            """python/_poplar_executor.py: PoplarExecutor.detachFromDevice."""
            if not self.isCompiled():
                raise _py_error(NO_EXECUTABLE_ERR)
            if not self._is_attached:
                raise _py_error("Device is not attached")
            state.system.release(self)
            self._is_attached = False

        def attachToDevice(self):
            """python/_poplar_executor.py: PoplarExecutor.attachToDevice."""
            if not self.isCompiled():
                raise _py_error(NO_EXECUTABLE_ERR)
            assert self._options.connection_type != ConnectionType.Never, (
                "Trying to attach to an offline device (ConnectionType.Never)")
            if self._is_attached:
                raise _py_error("Device is already attached")
            state.system.acquire(self, self._ipus)
            self._is_attached = True

        def copyWeightsToHost(self):
            if not self.isCompiled():
                raise _py_error(NO_EXECUTABLE_ERR)

        def copyWeightsToDevice(self):
            if not self.isCompiled():
                raise _py_error(NO_EXECUTABLE_ERR)

        def copyWeightsToHostIfNeeded(self):
            return False  # the host's parameters are the device's

        def destroy(self):
            """python/_poplar_executor.py: PoplarExecutor.destroy — releases the IPUs and, for training, unwraps
            the model (nothing at all when never compiled)."""
            if not self.isCompiled():
                return
            state.system.release(self)
            self._executable, self._is_attached = None, False
            if not self._training:
                return
            if not _is_wrapped(state, self._user_model):
                raise _py_error("model was never wrapped")
            self._user_model.__class__ = self._user_model.__class__.__bases__[0]

    return PoplarExecutor


def _reduce_over_instances(optimizer, options, mean):
    """The replicas of every poprun instance reduce their gradients together, by the options' reduction type (on the
    IPUs through GCL; graphcore/tutorials feature_examples/pytorch/popdist/popdist_training.py: the instances' weights
    stay identical). The double's stand-in is the torch.distributed group of the test's processes."""
    processes = options.Distributed.numProcesses
    if processes == 1:
        return
    assert dist.is_initialized() and dist.get_world_size() == processes, (
        f"the PopTorch double runs {processes} instances over a torch.distributed group of as many processes "
        "(the double's own rule: real PopTorch reduces over the IPU links): start one")
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                if mean:
                    param.grad /= processes


class _modes:
    """The train/eval flags compiled into the executable, whatever the host model's are now."""

    def __init__(self, modes):
        self._modes, self._saved = modes, {}

    def __enter__(self):
        self._saved = {m: m.training for m in self._modes}
        for module, training in self._modes.items():
            module.training = training

    def __exit__(self, *exc):
        for module, training in self._saved.items():
            module.training = training


class _device_values:
    """The optimizer's group values as the device has them (those of the last setOptimizer) during a step."""

    def __init__(self, optimizer, device_groups):
        self._optimizer, self._device_groups, self._host = optimizer, device_groups, None

    def __enter__(self):
        self._host = _group_values(self._optimizer)
        for group, values in zip(self._optimizer.param_groups, self._device_groups):
            group.update(values)

    def __exit__(self, *exc):
        for group, values in zip(self._optimizer.param_groups, self._host):
            group.update(values)


def _check_pipeline_depth(options, manager, training):
    """popart_compiler/source/Compiler.cpp: Compiler::initSession with CompilerImpl::numPipelineStages — forward
    stages = IPU switches + 1; training doubles them less one and needs gradientAccumulation >= that; inference
    needs deviceIterations >= the forward stages. Sharded execution is not pipelined."""
    if isinstance(options._execution_strategy, ShardedExecution):
        return
    where = "popart_compiler/source/Compiler.cpp"
    forward = manager.switches + 1
    if training:
        stages = forward * 2 - 1
        if options.Training.gradient_accumulation < stages:
            raise _cpp_error(
                f"poptorch.Options().Training.gradientAccumulation must be greater than or equal to the number of "
                f"pipeline stages ({stages}) when using poptorch.PipelinedExecution. Please note that a model with "
                f"{(stages + 1) // 2} pipeline stages in PopTorch will have an additional {(stages - 1) // 2} stages "
                "when training.", where)
    elif options.device_iterations < forward:
        raise _cpp_error(f"poptorch.Options().deviceIterations must be greater than or equal to the number of "
                         f"pipeline stages ({forward}) when using PopTorch.PipelinedExecution.", where)


def _check_shared_weights(options, trace, model):
    """popart: willow/src/transforms/pipeline.cpp: setIPUCopyPipelineStage — when pipelining (more than one IPU
    used, popart_compiler/source/Compiler.cpp: enablePipelining), a weight cannot be copied between IPUs: the
    layers that share it must be on one IPU (docs/user_guide/overview.rst)."""
    if isinstance(options._execution_strategy, ShardedExecution) or len(trace.stage_manager.used_ipus) < 2:
        return
    for name, param in model.named_parameters():
        if len(trace.params_on_ipus.get(id(param), ())) > 1:
            raise _popart_error(f"Can not copy variable tensor {name} between virtual graphs when pipelining. All "
                                "pipeline stages using this tensor should be on the same graph.",
                                "willow/src/transforms/pipeline.cpp")


# ----------------------------------------------------------------------------------------------------- wrapping
def _is_wrapped(state, obj):
    # python/_impl.py: isWrapped — an instance of a registered wrapper type
    return isinstance(obj, tuple(state.wrapper_types))


def _wrap_user_model(state, executor):
    """python/_poplar_executor.py: PoplarExecutor.__init__ — a training model's class becomes a subclass named
    Poptorch<Class> with destroy() and copyWeightsToHostIfNeeded(), registered as a wrapper type."""
    model = executor._user_model

    class PoptorchModel(type(model)):
        def copyWeightsToHostIfNeeded(self):
            return executor.copyWeightsToHostIfNeeded()

        def destroy(self):
            executor.destroy()

    PoptorchModel.__name__ = PoptorchModel.__qualname__ = "Poptorch%s" % type(model).__name__
    model.__class__ = PoptorchModel
    state.wrapper_types.append(PoptorchModel)


def _make_wrappers(state, executor_class):
    def trainingModel(model, options=None, optimizer=None):
        """python/__init__.py: trainingModel(model, options=None, optimizer=None)."""
        if isinstance(model, executor_class):
            model = model._user_model
        if _is_wrapped(state, model):  # python/__init__.py: trainingModel — wrapped once only
            raise RuntimeError("Model has already been wrapped in 'poptorch.trainingModel'. Call model.destroy() "
                               "on the model to unwrap before wrapping again.")
        return executor_class(model=copy.copy(model), options=options, training=True, optimizer=optimizer,
                              user_model=model, poptorch_version=__version__)

    def inferenceModel(model, options=None):
        """python/__init__.py: inferenceModel(model, options=None) — no wrapped check in the original."""
        if isinstance(model, executor_class):
            model = model._user_model
        return executor_class(model=copy.copy(model), options=options, training=False,
                              poptorch_version=__version__)

    return trainingModel, inferenceModel


# ------------------------------------------------------------------------------------------------------ DataLoader
class DataLoader(torch.utils.data.DataLoader):
    """python/__init__.py: DataLoader — a torch DataLoader whose batches are the combined batch: batch_size x
    device iterations x (replicas / input group size) x gradient accumulation; drop_last=True drops the last
    incomplete one. The Async modes read in this process (no AsynchronousDataAccessor) with the same batches."""

    def __init__(self, options, dataset, batch_size=1, shuffle=None, num_workers=0, drop_last=True,
                 persistent_workers=None, auto_distributed_partitioning=True, mode=DataLoaderMode.Sync,
                 async_options=None, rebatched_worker_size=None, batch_sampler=None, **kwargs):
        if batch_sampler is not None:
            raise NotImplementedError("the PopTorch double does not model batch_sampler")
        assert isinstance(options, Options)
        options._freeze()
        self._options, self._mode = options, mode
        self._combined_batch_size = None if batch_size is None else batch_size * _combined_factor(options)
        if rebatched_worker_size is not None and self._combined_batch_size is not None:
            assert rebatched_worker_size <= self._combined_batch_size, (
                f"The rebatched_worker_size ({rebatched_worker_size}) must be <= to the combined batch size "
                f"({self._combined_batch_size})")
        self._warn_incomplete(dataset, drop_last, options)
        if options.Distributed.numProcesses > 1 and auto_distributed_partitioning:
            dataset = _process_share(dataset, options, self._combined_batch_size, drop_last, shuffle)
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        super().__init__(dataset, batch_size=self._combined_batch_size, shuffle=bool(shuffle),
                         num_workers=num_workers, drop_last=drop_last, persistent_workers=persistent_workers,
                         **kwargs)

    def _warn_incomplete(self, dataset, drop_last, options):
        # python/__init__.py: DataLoader.__init__ — the last batch is smaller when drop_last=False, reckoned against
        # the combined batch of all processes (x Distributed.numProcesses), whatever auto_distributed_partitioning
        if drop_last or self._combined_batch_size is None or isinstance(dataset, torch.utils.data.IterableDataset):
            return
        per_step = self._combined_batch_size * options.Distributed.numProcesses
        left = len(dataset) % per_step
        if left:
            logger.warning("The number of elements in the dataset (%d) is not divisible by the number of elements "
                           "processed per step (%d) and drop_last=False. The last tensor will have a batch size of "
                           "%d. To avoid having to handle this special case switch to drop_last=True",
                           len(dataset), per_step, left)

    def __iter__(self):
        for batch in super().__iter__():
            if self._mode in (DataLoaderMode.Async, DataLoaderMode.AsyncRebatched):
                _check_flat_tensors(batch)
            yield batch

    @property
    def combinedBatchSize(self):
        return self._combined_batch_size

    @property
    def options(self):
        return self._options

    def terminate(self):
        return None


def _process_share(dataset, options, step, drop_last, shuffle):
    """python/__init__.py: DataLoader.__init__ and _SubDataset — with several processes and
    auto_distributed_partitioning, each process reads a contiguous block of the dataset: with drop_last, as many
    whole combined batches as every process can have; without, the samples spread as evenly as they go."""
    assert not isinstance(dataset, torch.utils.data.IterableDataset), (
        "auto_distributed_partitioning not supported for IterableDataset")
    assert not shuffle or options.exists("random_seed"), (
        "When using auto_distributed_partitioning you must set poptorch.Options.randomSeed() to ensure that tensors "
        "are in the same order in all processes.")
    assert step is not None, "batch_size=None not allowed when using auto_distributed_partitioning."
    if shuffle:
        raise NotImplementedError("the PopTorch double does not model shuffling across processes")
    processes, index, total = options.Distributed.numProcesses, options.Distributed.processId, len(dataset)
    if drop_last:
        per_process = step * (total // (step * processes))
        first, length = index * per_process, min(per_process, total - index * per_process)
    else:
        shares = [total // processes + (total % processes > rank) for rank in range(processes)]
        first, length = sum(shares[:index]), shares[index]
    return torch.utils.data.Subset(dataset, range(first, first + length))


def _check_flat_tensors(batch):
    """python/_dataloader.py: AsynchronousDataAccessor's worker — a tensor, or a flat container of tensors only."""
    values = list(batch.values()) if isinstance(batch, dict) else [batch] if torch.is_tensor(batch) else list(batch)
    for index, tensor in enumerate(values):
        assert isinstance(tensor, torch.Tensor), (
            f"Tensor at index {index} is not a torch tensor ({type(tensor)}). AsynchronousDataAccessor expects data "
            "to be organised as a flat 1D container of tensors.")


# -------------------------------------------------------------------------------------------------------- module
def make_strict_poptorch(ipus_in_system=None, check_modes=True):
    """A fresh `poptorch` module. `ipus_in_system`: the IPUs of the machine (None: as many as the first model that
    attaches). `check_modes`: refuse a training model compiled in eval mode and an inference model compiled in
    train mode (the double's own rule, see `_check_mode`)."""
    module = types.ModuleType("poptorch")
    state = types.SimpleNamespace(stage_manager=None, loss_tracer=None, wrapper_types=[], executors=[],
                                  system=_System(ipus_in_system), check_modes=check_modes)
    executor = _make_executor(state)
    BeginBlock, removeBlocks, Block = _make_blocks(state)
    trainingModel, inferenceModel = _make_wrappers(state, executor)
    names = dict(
        __version__=__version__, Error=Error, Options=Options, TensorLocationSettings=TensorLocationSettings,
        PipelinedExecution=PipelinedExecution, ShardedExecution=ShardedExecution, BeginBlock=BeginBlock,
        Block=Block, removeBlocks=removeBlocks, recomputationCheckpoint=recomputationCheckpoint,
        identity_loss=_make_identity_loss(state), trainingModel=trainingModel, inferenceModel=inferenceModel,
        PoplarExecutor=executor, DataLoader=DataLoader, isRunningOnIpu=lambda: False,
        ipuHardwareIsAvailable=lambda num_ipus=1: False, _double=state,
        optim=_optim_module())
    names.update({e.__name__: e for e in ENUMS})
    module.__dict__.update(names)
    return module


def _optim_module():
    optim = types.ModuleType("poptorch.optim")
    optim.__dict__.update(Optimizer=Optimizer, SGD=SGD, Adam=Adam, AdamW=AdamW, RMSprop=RMSprop, LAMB=LAMB)
    return optim


# ------------------------------------------------------------------------------------------------------- popdist
def make_strict_popdist(instances, replicas, ipus_per_replica=1, index=0):
    """A fresh `popdist` module (with `popdist.poptorch`) as instance `index` of `poprun --num-instances instances
    --num-replicas replicas --ipus-per-replica ipus_per_replica` sees it."""
    # poprun: --num-replicas must be divisible by --num-instances (each instance runs the same number of replicas)
    assert replicas % instances == 0 and 0 <= index < instances, "poprun refuses this launch"
    local = replicas // instances
    module = types.ModuleType("popdist")
    # graphcore/examples nlp/bert/pytorch/args.py: init_popdist and utils.py: the getters, by these names; the local
    # replicas are the total over the instances (its global_batch_size multiplies them by getNumInstances())
    module.__dict__.update(
        isPopdistEnvSet=lambda: True, getNumInstances=lambda: instances, getInstanceIndex=lambda: index,
        getNumTotalReplicas=lambda: replicas, getNumLocalReplicas=lambda: local,
        getNumIpusPerReplica=lambda: ipus_per_replica, getReplicaIndexOffset=lambda: index * local)
    module.poptorch = types.ModuleType("popdist.poptorch")
    module.poptorch.Options = _popdist_options(local, index, instances)
    return module


def _blocked(name):
    def refuse(self, *args, **kwargs):
        # graphcore/poptorch tests/popdist_test.py: test_blocked_options
        raise RuntimeError(f"Cannot call `{name}` with popdist.poptorch.Options")
    return refuse


class _PopdistDistributed(_DistributedOptions):
    """The Distributed options of popdist.poptorch.Options: set by popdist, refused to the user (graphcore/poptorch
    tests/options_test.py: test_wrap_options — popdist swaps the class of opts.Distributed)."""

    disable = _blocked("Distributed.disable")
    setEnvVarNames = _blocked("Distributed.setEnvVarNames")
    configureProcessId = _blocked("Distributed.configureProcessId")


def _popdist_options(local_replicas, index, instances):
    class PopdistOptions(Options):
        """popdist.poptorch.Options(ipus_per_replica=None): a poptorch.Options whose replication factor is this
        instance's replicas (graphcore/poptorch docs/user_guide/experimental.rst: the local replicas, not the total;
        graphcore/tutorials feature_examples/pytorch/popdist/popdist_training.py: "Replication factor is already set
        via PopRun") and whose Distributed process id and count are poprun's (tests/popdist_test.py: test_getters);
        replicationFactor, useIpuId and the Distributed setters raise (tests/popdist_test.py:
        test_blocked_options)."""

        replicationFactor = _blocked("replicationFactor")
        useIpuId = _blocked("useIpuId")

        def __init__(self, ipus_per_replica=None):
            super().__init__()
            Options.replicationFactor(self, local_replicas)
            self._distributed.configureProcessId(index, instances)
            self._distributed.__class__ = _PopdistDistributed
            self.__dict__["ipus_per_replica"] = ipus_per_replica  # read by the tests: what the caller asked

    return PopdistOptions
