"""The worker process: runs one reference or one candidate module on behalf of the judge.

Started by `hetforge.optimizer.sandbox.WorkerProcess` as `python -m hetforge.optimizer.worker
READ_FD WRITE_FD`. Everything in this process is untrusted once a candidate is imported: the
judge treats every reply as a claim, checks the data itself and keeps its own clock. Binding the
clocks first only keeps an honest candidate's own timing honest; it is not what the verdict rests on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

_perf_counter = time.perf_counter  # bound before any candidate code is imported
_sleep = time.sleep


def die_with_parent() -> None:
    """SIGKILL when the judge dies (PR_SET_PDEATHSIG), stopped or not; exit now if it is already gone.
    Set before torch is imported (seconds) so that a judge killed meanwhile leaves no worker; set again after
    a change of user, which clears it."""
    if not _PARENT:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != int(_PARENT):  # the judge died before the request took effect: reparented already
        os._exit(1)


_PARENT = os.environ.pop("HETFORGE_WORKER_PARENT", None)
die_with_parent()

import errno  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from hetforge.core.problem import LoadedProblem, Problem, load_module_file  # noqa: E402
from hetforge.optimizer import confine  # noqa: E402
from hetforge.optimizer.channel import Channel, ChannelClosed  # noqa: E402
from hetforge.optimizer.correctness import beyond_the_draw  # noqa: E402

_CudaEvent = torch.cuda.Event
_synchronize = torch.cuda.synchronize
# Device memory handed back to the driver is scrubbed in the background, and the scrub takes memory bandwidth:
# on the H100 a 2.95 GB reduction ran 1.135 ms instead of 0.970 ms for ~25 ms after 12 GB were freed, for over
# 45 ms after 24 GB (bench/verify/probe_large_timing.py, results_large_timing_h100.txt: about 0.45 TB/s).
# A release waits that out (at a lower rate, for margin), so that whatever is timed next runs on a quiet device.
SCRUB_BYTES_PER_S = 0.3e12


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure. CUDA's has a type; the CPU allocator's ("DefaultCPUAllocator:
    can't allocate memory") and those of other libraries are RuntimeErrors told apart only by their text."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def _flatten(value: Any) -> list[Any]:
    return [y for x in value for y in _flatten(x)] if isinstance(value, (list, tuple)) else [value]


def _describe_outputs(value: Any) -> list[dict]:
    """What the judge cannot see in the bytes: each output's Python type, layout and device."""
    out = []
    for item in _flatten(value):
        plain = type(item) is torch.Tensor  # subclasses can defer work or lie about their data
        info = {"type": type(item).__qualname__, "plain": plain}
        if isinstance(item, torch.Tensor):
            info.update(device=item.device.type, layout=str(item.layout), meta=bool(item.is_meta))
        out.append(info)
    return out


def _structure(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_structure(v) for v in value]
    return "tensor" if isinstance(value, torch.Tensor) else type(value).__qualname__


class Worker:
    """Holds the module and the timing state; one method per command of the protocol."""

    def __init__(self) -> None:
        self.problem: LoadedProblem | None = None
        self.model_class: Any = None
        self.device = "cpu"
        self.timing_inputs: list[list] = []
        self.models: dict[int, torch.nn.Module] = {}  # the module under `seed` (a reference: under each seed asked for)
        self.models64: dict[int, torch.nn.Module] = {}  # their float64 copies (the judge's tie-breaker)
        self.seed = 0  # the seed the module was built under
        self.timed_seed = 0
        self.timed_model: torch.nn.Module | None = None
        self._inputs: tuple[int, list[list]] | None = None  # the last seed's input sets
        self.timed_outputs: list[Any] = []
        self.precision = "strict"
        self.role = "reference"
        self.baseline = "eager"
        self.confinement: dict[str, str] = {}
        self.rules: dict | None = None  # the confinement asked for (None: none)

    def init(self, msg: dict) -> dict:
        self.device = msg["device"]
        self.role = msg["role"]
        self.precision = msg.get("precision", "strict")
        self.baseline = msg.get("baseline", "eager")
        self.weights_from_reference = bool(msg.get("weights_from_reference"))
        torch.set_num_threads(int(msg.get("threads", 1)))
        _set_matmul_precision("strict")
        if self.device == "cuda":
            fraction = float(msg.get("cuda_memory_fraction", 0.9))
            torch.cuda.set_per_process_memory_fraction(fraction)
        if self.rules:  # reads closed to what this problem and candidate need, before either is loaded
            if self.device == "cuda":
                torch.cuda.init()  # the driver opens its files first (a spare's context is made before this already)
            readable = problem_paths(msg["problem"]) + ([msg["candidate_file"]] if msg.get("candidate_file") else [])
            self.confinement.update(confine.confine_reads(readable, self.rules["writable"], _drops_user(self.rules)))
            die_with_parent()  # a change of user clears the parent-death signal
        self.problem = Problem.from_json(msg["problem"]).load()
        if self.role == "candidate":
            module = load_module_file(msg["candidate_file"], name="hetforge_candidate")
            if not hasattr(module, "ModelNew"):
                return {"error": "no_model_new", "message": "the candidate file must define class ModelNew(nn.Module)"}
            self.model_class = module.ModelNew
        else:
            self.model_class = self.problem.model_class
        reply = self.build({"seed": msg["seed"]})
        if "error" in reply:
            return reply
        if self.role == "reference":  # the judge asks the reference for each set by index
            reply["input_sets"] = 1 + len(self.problem.get_variants())
        return {**reply, "confinement": self.confinement}

    def build(self, msg: dict) -> dict:
        self.seed = int(msg["seed"])
        model = self.problem.build(self.model_class, seed=self.seed, device=self.device)
        if self.role == "candidate" and self.weights_from_reference:
            # a module variant is served with the running instance's weights: load the reference's
            reference = self.problem.build(seed=int(msg["seed"]), device=self.device)
            try:
                model.load_state_dict(reference.state_dict(), strict=True)
            except RuntimeError as err:
                return {
                    "error": "state_dict_mismatch",
                    "message": "ModelNew must take Model's state_dict: " + str(err).splitlines()[0][:300],
                }
        if self.role == "reference" and self.baseline == "compile":
            model = torch.compile(model)
        self.models, self.models64 = {self.seed: model}, {}
        return {"ok": True}

    def run(self, msg: dict) -> dict:
        """One call on input set `set` generated under `seed`; a reference may be asked for its module under
        another `model_seed` (kept beside the first: the judge's re-initialization check)."""
        inputs = self._input_sets(int(msg["seed"]))[int(msg.get("set", 0))]
        if msg.get("transform"):  # the judge's check beyond the problem's own draw
            inputs = beyond_the_draw(inputs, str(msg["transform"]), int(msg["seed"]))
        model_seed = int(msg.get("model_seed", self.seed))
        if msg.get("float64"):
            return self._run_float64(inputs, msg.get("sample"), model_seed)
        model = self._module(model_seed)
        if model is None:
            return _ONLY_REFERENCE
        before = [x.clone() if isinstance(x, torch.Tensor) else None for x in inputs]
        with torch.no_grad():
            out = model(*inputs)
        self._sync()
        modified = [
            i for i, (x, b) in enumerate(zip(inputs, before, strict=False)) if b is not None and not torch.equal(x, b)
        ]
        if modified:
            self._inputs = None  # a later call on this seed (the float64 re-run) gets the values as generated
        return {
            "outputs": self._payload(out, msg.get("sample")),
            "structure": _structure(out),
            "info": _describe_outputs(out),
            "inputs_modified": modified,
        }

    def _module(self, seed: int) -> torch.nn.Module | None:
        """The module built under `seed`: a reference keeps one per seed asked for (None: a candidate asked for
        another seed than it was built under; it is rebuilt instead)."""
        if seed not in self.models:
            if self.role != "reference":
                return None
            model = self.problem.build(self.model_class, seed=seed, device=self.device)
            self.models[seed] = torch.compile(model) if self.baseline == "compile" else model
        return self.models[seed]

    def _input_sets(self, seed: int) -> list[list]:
        """The problem's input sets under `seed`, made on the device itself like the timing inputs below: the
        judge sends seeds, not tensors (a memory-bound problem's 256 MB inputs took most of a check to move).
        Both sides make identical values; a candidate that tampers with its own generator only gets outputs
        that differ from the reference's."""
        if self._inputs is None or self._inputs[0] != seed:
            self._inputs = None  # free the last set first
            with torch.device(self.device):
                self._inputs = (seed, self.problem.input_sets(seed, self.device))
        return self._inputs[1]

    def prepare_timing(self, msg: dict) -> dict:
        """Generate one fresh input set per timed call (new values every call), then warm up."""
        # Made on the device itself (factory calls of get_inputs default to it): a memory-bound problem's
        # 256 MB inputs took ~1 s each to fill on the host and copy over, most of a verification's timing phase.
        # Both sides use the same seeds on the same device, so they time identical values.
        # The last round's sets go first (large inputs must not be held twice), into the allocator's cache: the
        # new sets reuse those blocks, and nothing goes back to the driver, whose scrub would slow the timed calls.
        self._drop_inputs()
        with torch.device(self.device):
            self.timing_inputs = [self.problem.main_inputs(int(seed), self.device) for seed in msg["seeds"]]
        self.timed_seed = int(msg.get("model_seed", self.seed))  # the reference is timed as the candidate is built
        self.timed_model = self._module(self.timed_seed)
        if self.timed_model is None:
            return _ONLY_REFERENCE
        self.timed_outputs = []
        self._flush = (
            torch.empty(int(msg.get("flush_bytes", 0)) // 4, dtype=torch.int32, device=self.device)
            if self.device == "cuda"
            else None
        )
        with torch.no_grad(), self._timing_precision():
            for _ in range(int(msg.get("warmup", 3))):
                self.timed_model(*self.timing_inputs[0])
        self._sync()
        return {"ok": True}

    def _drop_inputs(self) -> None:
        """Drop the timed input sets and outputs and the correctness inputs (into the allocator's cache)."""
        self.timing_inputs, self.timed_outputs, self._inputs, self._flush = [], [], None, None

    def release(self, msg: dict) -> dict:
        """Drop the timed input sets and outputs (and the correctness inputs), returning the device's memory;
        on CUDA, answer once the driver has had time to scrub it (SCRUB_BYTES_PER_S, at most a second)."""
        self._drop_inputs()
        freed = 0
        if self.device == "cuda":
            reserved = torch.cuda.memory_reserved()
            torch.cuda.empty_cache()
            freed = max(0, reserved - torch.cuda.memory_reserved())
            _sleep(min(1.0, freed / SCRUB_BYTES_PER_S))
        return {"ok": True, "freed_bytes": freed}

    def time(self, msg: dict) -> dict:
        """Run every prepared input set once, timing each call; keep the outputs for `fetch`."""
        times: list[float] = []
        outputs: list[Any] = []
        with torch.no_grad(), self._timing_precision():
            if self.device == "cuda":
                events = [(_CudaEvent(enable_timing=True), _CudaEvent(enable_timing=True)) for _ in self.timing_inputs]
                for inputs, (start, end) in zip(self.timing_inputs, events, strict=True):
                    if self._flush is not None and self._flush.numel():
                        self._flush.zero_()  # evict the previous call's data from L2
                    start.record()
                    outputs.append(self.timed_model(*inputs))
                    end.record()
                _synchronize()
                times = [start.elapsed_time(end) for start, end in events]
            else:
                for inputs in self.timing_inputs:
                    t0 = _perf_counter()
                    outputs.append(self.timed_model(*inputs))
                    times.append((_perf_counter() - t0) * 1e3)
        self.timed_outputs = outputs
        return {"times_ms": times}

    def _run_float64(self, inputs: list, sample: dict | None, model_seed: int) -> dict:
        """The reference recomputed in float64 (the judge's tie-breaker when a candidate disagrees with the
        float32 reference: is the candidate wrong, or more exact than the reference?). References only."""
        if self.role != "reference":
            return {"error": "protocol", "message": "float64 runs are the reference's"}
        if model_seed not in self.models64:
            self.models64[model_seed] = self.problem.build(
                self.model_class, seed=model_seed, device=self.device
            ).double()
        inputs = [
            x.to(self.device).double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
        ]
        with torch.no_grad():
            out = self.models64[model_seed](*inputs)
        self._sync()
        return {"outputs": self._payload(out, sample), "info": _describe_outputs(out)}

    def fetch(self, msg: dict) -> dict:
        """Timed outputs for the judge: whole, or (`sample`) at positions drawn from the judge's seed;
        `float64`: the reference's output for those timed inputs, recomputed in float64."""
        if msg.get("float64"):
            return self._run_float64(
                self.timing_inputs[int(msg["indices"][0])], msg.get("sample"), self.timed_seed
            )  # as `run` replies
        chosen = [self.timed_outputs[int(i)] for i in msg["indices"]]
        sample = msg.get("sample")
        return {"outputs": [self._payload(o, sample) for o in chosen], "info": [_describe_outputs(o) for o in chosen]}

    def _payload(self, out: Any, sample: dict | None = None) -> Any:
        if isinstance(out, (list, tuple)):
            return [self._payload(o, sample) for o in out]
        if isinstance(out, torch.Tensor):
            if out.is_meta:
                return None
            # as_subclass: read the values through the base class, whatever the object claims to be
            plain = out.as_subclass(torch.Tensor).detach()
            count = int(sample["count"]) if sample else 0
            if count and plain.numel() > max(count, int(sample.get("above", 0))):
                positions = torch.randint(
                    0, plain.numel(), (count,), generator=torch.Generator().manual_seed(int(sample["seed"]))
                )
                return {"sampled": plain.reshape(-1)[positions.to(plain.device)].cpu(), "shape": list(plain.shape)}
            return plain.clone()
        return out if isinstance(out, (int, float, bool, str)) or out is None else repr(out)[:200]

    def _sync(self) -> None:
        if self.device == "cuda":
            _synchronize()

    def _timing_precision(self):
        """The reference is timed at the precision the stage allows, so speedups compare like with like."""
        if self.role != "reference" or self.precision == "strict":
            return _Nothing()
        if self.precision == "tf32":
            return _MatmulPrecision("tf32")
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16)


_ONLY_REFERENCE = {
    "error": "protocol",
    "message": "only the reference keeps modules under other seeds; a candidate is rebuilt",
}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MatmulPrecision:
    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        _set_matmul_precision(self.mode)

    def __exit__(self, *exc):
        _set_matmul_precision("strict")
        return False


def _set_matmul_precision(mode: str) -> None:
    allow = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    torch.set_float32_matmul_precision("high" if allow else "highest")


def _drops_user(rules: dict) -> bool:
    """Generated code runs as an unprivileged user where the host allows; trusted workers share the compile cache."""
    return not rules.get("trusted") and os.geteuid() == 0


def problem_paths(doc: dict) -> list[str]:
    """What the problem `doc` (Problem.to_json) reads: every path it names, and the folder of its file (a problem
    file may import modules beside it)."""
    base = doc.get("base_dir")
    out: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, str) and value:
            for path in (value, os.path.join(base, value) if base else None):
                if path and os.path.isabs(path) and os.path.exists(path):
                    out.append(path)

    visit(doc)
    if doc.get("file"):
        out.append(os.path.dirname(doc["file"]))
    return sorted({p for p in out if os.path.realpath(p) != "/"})


_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _os_error(err: OSError, confined: bool) -> dict:
    """An OSError of candidate code; one that the confinement caused says so (and which rule)."""
    text = f"{type(err).__name__}: {err}"[:2000]
    # Confinement replies stay short (no traceback): forked copies of this process may answer on the same
    # pipe at once, and writes under PIPE_BUF (4 KiB) do not interleave.
    if confined and err.errno in _DENIED:
        what = "the network, files outside its scratch folder and process control are closed to candidates"
        return {"error": "confined", "message": f"denied by the worker's confinement ({what}): {text[:600]}"}
    if confined and err.errno == errno.EAGAIN and isinstance(err, BlockingIOError):
        return {
            "error": "confined",
            "message": f"process limit of the worker's confinement reached (a fork bomb?): {text[:600]}",
        }
    return {"error": "exception", "message": text, "traceback": traceback.format_exc()[-4000:]}


def main(argv: list[str]) -> int:
    read_fd, write_fd = int(argv[1]), int(argv[2])
    memory_mb = int(argv[3]) if len(argv) > 3 else 0
    if memory_mb > 0:  # a runaway allocation fails here instead of taking the machine down
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if os.environ.pop("HETFORGE_WORKER_WARM_CUDA", None) and torch.cuda.is_available():
        torch.cuda.init()  # a spare worker: the context is ready before any candidate code arrives
    worker = Worker()
    rules = os.environ.pop("HETFORGE_WORKER_CONFINE", None)
    if rules:  # before any problem or candidate code is imported; a failure leaves the worker unusable
        rules = json.loads(rules)
        worker.rules = rules
        worker.confinement = confine.confine(
            rules["writable"],
            cpu_s=int(rules["cpu_s"]),
            max_procs=int(rules["max_procs"]),
            cgroup=rules.get("cgroup"),
            drop_user=_drops_user(rules),
        )
    channel = Channel(read_fd, write_fd)
    while True:
        try:
            msg = channel.recv()
        except ChannelClosed:
            return 0
        command = msg.get("cmd")
        if command == "exit":
            return 0
        handler = (
            getattr(worker, command, None)
            if command in ("init", "build", "run", "prepare_timing", "time", "fetch", "release")
            else None
        )
        try:
            reply = handler(msg) if handler else {"error": "protocol", "message": f"unknown command {command!r}"}
        except MemoryError as err:
            reply = {"error": "out_of_memory", "message": f"MemoryError: {err}"}
        except OSError as err:
            reply = _os_error(err, bool(worker.confinement))
        except BaseException as err:  # noqa: BLE001 - any failure of candidate code is reported, not fatal
            kind = "out_of_memory" if _out_of_memory(err) else "exception"
            reply = {
                "error": kind,
                "message": f"{type(err).__name__}: {err}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
        try:
            channel.send(reply)
        except ChannelClosed:
            return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv))
