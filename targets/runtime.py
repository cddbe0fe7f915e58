"""Running an artifact, anywhere: the one runtime, the one parity rule and the programs
that drive entries, shared by the host (edgec), the device agent and the RPC runner.

Standard library + numpy + the TVM runtime or ONNX Runtime only: this file is uploaded
to devices beside agent.py, which have neither edgec nor torch.

A *program* is data in the manifest (written by the model's family) that says how
entries are driven:

    {"kind": "forward", "entries": {...}}     each entry once on its reference inputs
    {"kind": "generate", "entries": {...}, "prefill": "prefill", "decode": "decode",
     "logits": "logits", "token_input": "input_ids",
     "cache": [{"output": "present_k", "input": "past_k", "tokens_axis": 0, "layout": [...], "append": true}, ...],
     "max_context": 1024, "eos_token_id": 2}
                                              a greedy loop: prefill, then decode with the
                                              cache outputs fed back as cache inputs by name;
                                              an `append` output holds only the new positions,
                                              added in place to a cache reserved for max_context
    {"kind": "steps", "entries": {...}, "inputs": {"x": "sparse0.in.0", ...},
     "steps": [{"entry": "sparse0", "inputs": ["x", "indptr", ...], "output": "h0"}, ...],
     "output": "logits"}                  entries chained by value names (a GCN's sparse and
                                              dense parts); the inputs come from the reference file
    {"kind": "sample", "entries": {...}, "regions": [{"entry": "denoise", "t_from": 0, "t_to": 1000}],
     "inputs": ["sample", "timestep", "class_labels"], "output": "noise",
     "scheduler": {"kind": "ddim", "alphas_cumprod": [...], ...}, "steps": 20,
     "guidance_scale": 2.0, "null_class": 10, "sample_shape": [1, 32, 32]}
                                              a diffusion sampler: each step calls the entry of
                                              its timestep region on [x, x] with [class, null]
                                              (classifier-free guidance), then the scheduler's
                                              update in numpy (DDIM or DDPM, as diffusers does it)

`entries` maps each entry to {"inputs": [names], "outputs": [names]}. Nothing here knows
what a family is; it reads names and roles from the program.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

PARITY_RULE = (
    "every output finite; max |artifact-reference| <= max(rtol x range(reference output), atol); an entry that "
    "fails to run fails; same argmax where the "
    "reference's top-2 margin > tolerance; a generate program also greedily decodes from the reference prompt "
    "and must produce the reference's tokens until a step whose reference margin <= tolerance"
)
GENERATION_STEPS = 32

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                       "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout: u64 header length, JSON header, raw little-endian data."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start : base + end], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


class Runs(Protocol):
    """Anything that runs an artifact's entries: Runtime here, RemoteTVM over RPC."""

    def run(self, entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


def tvm_with_cuda() -> Any:
    """The TVM runtime with its CUDA device API: a full install registers it at import,
    a runtime-only one (no libtvm_compiler, as on devices) does not, so load it here."""
    import ctypes

    import tvm

    library = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if library.is_file():
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    return tvm


def compile_cuda_at_load(tvm: Any, arch: str) -> None:
    """TVM 0.27 stores a CUDA module as CUDA C source and compiles it when the library
    loads, asking for the target through the compiler library, which a runtime-only
    install lacks. Answer with this GPU's arch instead (NVRTC, through cuda-bindings)."""
    import tvm_ffi
    from tvm.support import nvcc

    def compile_source(code: str) -> bytearray:
        return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)


def reuse_freed_memory() -> None:
    """Keep freed blocks of up to 32 MB in the heap for the next allocation (glibc). By
    default glibc maps big blocks afresh and trims the heap after frees, so each decode
    step's cache outputs were new pages faulted in one by one (~11,000 faults per step,
    SmolLM2 at 1,024 tokens of context; ~3 with this). Other C libraries: left as they are."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's largest allowed value on 64-bit
    mallopt(m_trim_threshold, 2**31 - 1)


class Runtime:
    """An artifact's entries loaded in the TVM Relax VM or ONNX Runtime on this machine.

    `model_dir`: the artifact's model/ directory (under qemu-user, the host-side path for
    ONNX external data); `on_gpu`: a CUDA artifact (TVM). An entry that records its own
    `device` (parts built for different targets) runs there; values move between devices
    through host memory, one copy each way per call."""

    def __init__(self, model_dir: Path, backend: str, record: dict[str, Any], on_gpu: bool = False,
                 ort_provider: str = "CPUExecutionProvider", threads: int | None = None) -> None:
        self.backend = backend
        if backend == "tvm":
            placed = {name: info.get("device", "cuda" if on_gpu else "cpu") for name, info in record["entries"].items()}
            gpu = "cuda" in placed.values()
            tvm = tvm_with_cuda() if gpu else __import__("tvm")
            from tvm.runtime.vm import VirtualMachine

            if "cpu" in placed.values():
                reuse_freed_memory()
            if threads is not None:  # 1: the pool on the (big) cores, with this many threads
                tvm.get_global_func("runtime.config_threadpool")(1, threads)
            self._tvm = tvm
            # The device kernels are timed on (the GPU when any entry runs there).
            self.device = tvm.cuda(0) if gpu else tvm.cpu()
            if gpu:
                compile_cuda_at_load(tvm, "sm_" + str(self.device.compute_version).replace(".", ""))
            stored = read_safetensors(model_dir / record["params_file"])
            self.vms: dict[str, Any] = {}
            self.params: dict[str, list[Any]] = {}
            self.devices: dict[str, Any] = {}
            on_device: dict[tuple[str, str], Any] = {}
            for name, info in record["entries"].items():
                device = self.devices[name] = tvm.cuda(0) if placed[name] == "cuda" else tvm.cpu()
                library = tvm.runtime.load_module(str(model_dir / info["library"]))
                # CPU: the naive allocator. The pooled one keeps every freed buffer under its
                # exact size, and a decode step's cache outputs grow by one position per step,
                # so it kept them all (SmolLM2 at 1,024 tokens of context: +45 MB of memory
                # per step, each step's outputs fresh pages to fault in).
                self.vms[name] = VirtualMachine(library, device, memory_cfg=None if placed[name] == "cuda" else "naive")
                for key in info["params"]:
                    if (key, placed[name]) not in on_device:  # a tensor shared by entries is uploaded once per device
                        on_device[key, placed[name]] = tvm.runtime.tensor(stored[key], device)
                self.params[name] = [on_device[key, placed[name]] for key in info["params"]]
        elif backend == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
            self.sessions = {
                name: ort.InferenceSession(str(model_dir / info["file"]), options, providers=[ort_provider])
                for name, info in record["entries"].items()
            }
        else:
            raise ValueError(f"unknown backend {backend!r}")

    def run(self, entry: str, inputs: list[Any], native: bool = False) -> list[Any]:
        """The entry's outputs as numpy arrays; `native`: as the runtime's own tensors, which
        a later call takes back without a copy (a decode step's cache: converting it both
        ways was a third of a TVM decode step at 1,024 tokens of context). `as_numpy` reads
        any of them."""
        if self.backend == "tvm":
            tvm = self._tvm
            device = self.devices[entry]
            args = [x if isinstance(x, tvm.runtime.Tensor) and x.device == device
                    else tvm.runtime.tensor(as_numpy(x), device) for x in inputs]
            result = self.vms[entry]["main"](*args, *self.params[entry])
            outputs = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
            return outputs if native else [item.numpy() for item in outputs]
        session = self.sessions[entry]
        feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
        return list(session.run(None, feed))


def as_numpy(value: Any) -> np.ndarray:
    """A runtime's output (numpy, or a TVM tensor from `Runtime.run(..., native=True)`) as a C-ordered numpy array."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    return value.numpy() if hasattr(value, "numpy") else np.ascontiguousarray(np.asarray(value))


# ----------------------------------------------------------------------------- programs
def shape_program(program: dict[str, Any], label: str) -> dict[str, Any]:
    """A generate program with several shapes (`--subnet all`) running the shape `label`."""
    return {**program, **program["shapes"][label], "shape": label}


class AppendedCache:
    """A cache that grows along its first axis, reserved for `capacity` positions at the
    first append, in the runtime that made it (numpy, or a TVM tensor on its device): each
    append writes the new positions after the filled ones, and `value`, the filled prefix,
    is a view, so no step copies the cache. Until the first append `value` is the prefill's
    output itself (a single decode step after a prefill reserves nothing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer: Any = None
        self.length = 0
        self.value: Any = None

    def reset(self, first: Any) -> None:
        self.buffer, self.value, self.length = None, first, int(first.shape[0])

    def append(self, new: Any) -> None:
        added = int(new.shape[0])
        needed = self.length + added
        if self.buffer is None or needed > int(self.buffer.shape[0]):
            # Past the capacity (a runner that ignores max_context), grow by doubling.
            positions = self.capacity if needed <= self.capacity else 2 * needed
            old, self.buffer = self.value, _reserve(self.value, positions)
            _write(self.buffer, 0, old)
        _write(self.buffer, self.length, new)
        self.length += added
        self.value = _prefix(self.buffer, self.length)


def _is_tvm(value: Any) -> bool:
    return hasattr(value, "_create_view")


def _reserve(like: Any, positions: int) -> Any:
    shape = (positions, *(int(d) for d in like.shape[1:]))
    if _is_tvm(like):
        import tvm

        return tvm.runtime.empty(shape, str(like.dtype), like.device)
    return np.empty(shape, dtype=np.asarray(like).dtype)


def _prefix(buffer: Any, positions: int) -> Any:
    if _is_tvm(buffer):
        return buffer._create_view((positions, *buffer.shape[1:]))
    return buffer[:positions]


def _write(buffer: Any, start: int, value: Any) -> None:
    """`value` into `buffer` from position `start` on (one copy of `value`'s bytes)."""
    if _is_tvm(buffer):
        row_bytes = int(np.prod([int(d) for d in buffer.shape[1:]], dtype=np.int64)) * np.dtype(str(buffer.dtype)).itemsize
        target = buffer._create_view((int(value.shape[0]), *buffer.shape[1:]), relative_byte_offset=start * row_bytes)
        target.copyfrom(value if _is_tvm(value) and value.device == buffer.device else as_numpy(value))
    else:
        buffer[start : start + int(value.shape[0])] = as_numpy(value)


class Generation:
    """A generate program's greedy loop over any runner, with the cache fed back by name.
    The caches the program appends are held here between calls (`decode_args`)."""

    def __init__(self, program: dict[str, Any]) -> None:
        self.program = program
        entries = program["entries"]
        self.prefill, self.decode = program["prefill"], program["decode"]
        self.prefill_outputs: list[str] = entries[self.prefill]["outputs"]
        self.decode_inputs: list[str] = entries[self.decode]["inputs"]
        self.decode_outputs: list[str] = entries[self.decode]["outputs"]
        self.feeds = {c["input"]: c["output"] for c in program["cache"]}
        for c in program["cache"]:
            if c.get("append") and int(c["tokens_axis"]) != 0:
                raise ValueError(f"cache {c['input']}: an appended cache grows along its first axis, not {c['tokens_axis']}")
        self.appended = {c["input"]: AppendedCache(int(program["max_context"])) for c in program["cache"] if c.get("append")}

    def logits(self, outputs: Sequence[Any], entry: str) -> Any:
        names = self.prefill_outputs if entry == self.prefill else self.decode_outputs
        return outputs[names.index(self.program["logits"])]

    def decode_args(self, token: np.ndarray, outputs: Sequence[Any], entry: str) -> list[Any]:
        """The decode inputs: the token, and each cache input from the previous call's
        outputs (`entry`: the call that made them). An appended cache starts over at a
        prefill's outputs and gains a decode's, so call this once per call made."""
        names = self.prefill_outputs if entry == self.prefill else self.decode_outputs
        by_name = dict(zip(names, outputs))
        args = []
        for name in self.decode_inputs:
            if name == self.program["token_input"]:
                args.append(token)
            elif name in self.appended:
                cache = self.appended[name]
                if entry == self.prefill:
                    cache.reset(by_name[self.feeds[name]])
                else:
                    cache.append(by_name[self.feeds[name]])
                args.append(cache.value)
            else:
                args.append(by_name[self.feeds[name]])
        return args

    def greedy(
        self,
        run: Callable[[str, list[Any]], Sequence[Any]],
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        on_step: Callable[[int, np.ndarray], None] | None = None,
    ) -> list[int]:
        """Greedy tokens after `prompt_ids`; `on_step(step, last_logits)` sees each step's logits."""
        limit = int(self.program["max_context"])
        outputs = run(self.prefill, [np.asarray([list(prompt_ids)], dtype=np.int64)])
        entry = self.prefill
        generated: list[int] = []
        length = len(prompt_ids)
        while len(generated) < max_new_tokens and length < limit:
            last = as_numpy(self.logits(outputs, entry))[0, -1]
            if on_step is not None:
                on_step(len(generated), last)
            token = int(np.argmax(last))
            generated.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            outputs = run(self.decode, self.decode_args(np.asarray([[token]], dtype=np.int64), outputs, entry))
            entry = self.decode
            length += 1
        return generated


def steps_inputs(program: dict[str, Any], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A steps program's input values, read from the reference file as the program maps them."""
    return {name: reference[key] for name, key in program["inputs"].items()}


def run_steps(runner: Runs, program: dict[str, Any], values: dict[str, Any],
              on_step: Callable[[str, float], None] | None = None) -> Any:
    """The steps in order, each entry's output bound to its name; returns the program's output."""
    bound = dict(values)
    for step in program["steps"]:
        began = time.perf_counter()
        bound[step["output"]] = runner.run(step["entry"], [bound[name] for name in step["inputs"]])[0]
        if on_step is not None:
            on_step(step["entry"], (time.perf_counter() - began) * 1e3)
    return bound[program["output"]]


def sampler_timesteps(scheduler: dict[str, Any], steps: int) -> list[tuple[int, int]]:
    """(t, previous t) for each of `steps` sampling steps, spaced as diffusers' `set_timesteps`
    spaces them; a previous t of -1 means the clean image."""
    total = int(scheduler["train_timesteps"])
    spacing = scheduler["spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (total // steps)).round()[::-1].astype(np.int64) + int(scheduler.get("steps_offset", 0))
    else:  # trailing
        ts = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
    if scheduler["kind"] == "ddim":  # DDIM steps back by the ratio, whatever the spacing
        return [(int(t), int(t) - total // steps) for t in ts]
    return [(int(t), int(ts[i + 1]) if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]


def _clean_and_noise(scheduler: dict[str, Any], x: np.ndarray, output: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The predicted clean image (clipped as configured) and noise from the model output."""
    kind = scheduler["prediction_type"]
    if kind == "epsilon":
        clean, noise = (x - (1 - alpha) ** 0.5 * output) / alpha**0.5, output
    elif kind == "sample":
        clean, noise = output, (x - alpha**0.5 * output) / (1 - alpha) ** 0.5
    else:  # v_prediction
        clean, noise = alpha**0.5 * x - (1 - alpha) ** 0.5 * output, alpha**0.5 * output + (1 - alpha) ** 0.5 * x
    if scheduler["clip_sample"]:
        bound = float(scheduler["clip_sample_range"])
        clean = np.clip(clean, -bound, bound)
    return clean, noise


def sampler_step(scheduler: dict[str, Any], x: np.ndarray, output: np.ndarray, t: int, prev: int,
                 noise: np.ndarray | None = None) -> np.ndarray:
    """x at `prev` from x at `t` and the model output: deterministic DDIM (eta 0), or DDPM's
    ancestral step with its fixed-small variance (`noise`: this step's standard normal draw)."""
    alphas = scheduler["alphas_cumprod"]
    alpha = float(alphas[t])
    alpha_prev = float(alphas[prev]) if prev >= 0 else float(scheduler["final_alpha_cumprod"])
    clean, eps = _clean_and_noise(scheduler, x, output, alpha)
    if scheduler["kind"] == "ddim":
        return (alpha_prev**0.5 * clean + (1 - alpha_prev) ** 0.5 * eps).astype(np.float32)
    beta_t = 1 - alpha / alpha_prev
    mean = (alpha_prev**0.5 * beta_t / (1 - alpha)) * clean + ((1 - beta_t) ** 0.5 * (1 - alpha_prev) / (1 - alpha)) * x
    if t > 0:
        assert noise is not None, "a DDPM step needs its noise draw"
        mean = mean + max((1 - alpha_prev) / (1 - alpha) * beta_t, 1e-20) ** 0.5 * noise
    return mean.astype(np.float32)


class Sampler:
    """A sample program's loop over any runner: classifier-free guidance over the entry of
    each step's timestep region, then the scheduler's update."""

    def __init__(self, program: dict[str, Any]) -> None:
        self.program = program
        self.scheduler = program["scheduler"]

    def entry_at(self, t: int) -> str:
        """The entry of the timestep region holding t (regions split the training timesteps,
        [t_from, t_to) each, as the model was trained)."""
        return next(r["entry"] for r in self.program["regions"] if r["t_from"] <= t < r["t_to"])

    def sample(self, run: Callable[[str, list[Any]], Sequence[Any]], label: int, start: np.ndarray, steps: int,
               guidance: float, step_noise: np.ndarray | None = None,
               on_step: Callable[[int, str, float], None] | None = None) -> np.ndarray:
        """One image [1, C, H, W] of class `label` from the noise `start` [1, C, H, W];
        `step_noise` [steps, 1, C, H, W]: DDPM's per-step draws."""
        x = np.asarray(start, dtype=np.float32)
        labels = np.asarray([label, int(self.program["null_class"])], dtype=np.int64)
        for index, (t, prev) in enumerate(sampler_timesteps(self.scheduler, steps)):
            entry = self.entry_at(t)
            began = time.perf_counter()
            output = np.asarray(run(entry, [np.concatenate([x, x]), np.asarray([t, t], dtype=np.int64), labels])[0])
            if on_step is not None:
                on_step(index, entry, (time.perf_counter() - began) * 1e3)
            guided = output[1:] + guidance * (output[:1] - output[1:])
            x = sampler_step(self.scheduler, x, guided, t, prev, None if step_noise is None else step_noise[index])
        return x


def sample_noise(program: dict[str, Any], seed: int, steps: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The starting noise [1, C, H, W] and (DDPM) the per-step draws of image `seed`, from
    numpy's generator: the same on every machine and in the torch reference."""
    rng = np.random.default_rng(seed)
    shape = (1, *program["sample_shape"])
    start = rng.standard_normal(shape).astype(np.float32)
    draws = rng.standard_normal((steps, *shape)).astype(np.float32) if program["scheduler"]["kind"] == "ddpm" else None
    return start, draws


def reference_prompt(reference: dict[str, np.ndarray]) -> np.ndarray:
    """The prompt the reference generation started from ([1, T] int64)."""
    return reference["generate.prompt.0"]


# ----------------------------------------------------------------------------- parity
def one_line(exc: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line (TVM's and ORT's messages span lines), at most `limit` characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


def _tolerance(want: np.ndarray, rtol: float, atol: float) -> float:
    """Relative to the output's range, never below `atol`: a near-constant output (a saturated
    softmax, a fully masked row) would otherwise be held to float noise."""
    finite = want[np.isfinite(want)]
    return max(rtol * float(finite.max() - finite.min()) if finite.size else 0.0, atol)


def compare_output(entry: str, name: str, want: np.ndarray, got: np.ndarray, rtol: float, is_logits: bool,
                   atol: float = 0.0) -> dict[str, Any]:
    """One output against its reference: a JSON-able record with `ok` and, if not, `why`."""
    record: dict[str, Any] = {"entry": entry, "output": name, "max_abs_diff": 0.0, "tolerance": 0.0, "argmax_mismatches": 0}
    if want.shape != got.shape:
        return {**record, "max_abs_diff": float("inf"), "ok": False,
                "why": f"shape {list(got.shape)}, reference {list(want.shape)}"}
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    tolerance = _tolerance(want64, rtol, atol)
    if want.dtype == np.int8:
        # Quantized values (an int8 cache): one on a level's edge may round either way. Other
        # integers (indices, counts) are held to the rule like floats.
        tolerance = max(tolerance, 1.0)
    record["tolerance"] = tolerance
    for values, whose in ((got64, "the artifact's"), (want64, "the reference's")):
        bad = ~np.isfinite(values)
        if bad.any():  # NaN compares false with everything: never let it through a bound
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            return {**record, "max_abs_diff": float("inf"), "ok": False,
                    "why": f"{int(bad.sum())} non-finite values in {whose} output, first {values[where]} at {list(where)}"}
    if not want64.size:
        return {**record, "ok": True}
    diff = np.abs(want64 - got64)
    worst = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
    record["max_abs_diff"] = float(diff[worst])
    if record["max_abs_diff"] > tolerance:
        return {**record, "ok": False, "why": f"max |diff| {record['max_abs_diff']:.3g} > tolerance {tolerance:.3g} at "
                f"{list(worst)} (artifact {got64[worst]:.6g}, reference {want64[worst]:.6g})"}
    if is_logits:
        top2 = np.sort(want64, axis=-1)[..., -2:]
        decisive = (top2[..., 1] - top2[..., 0]) > tolerance
        flips = (want64.argmax(-1) != got64.argmax(-1)) & decisive
        record["argmax_mismatches"] = int(flips.sum())
        if flips.any():
            where = tuple(int(i) for i in np.argwhere(flips)[0])
            return {**record, "ok": False, "why": f"argmax {int(got64[where].argmax())} at {list(where)}, reference "
                    f"{int(want64[where].argmax())} with margin {float(top2[where][1] - top2[where][0]):.3g} > tolerance {tolerance:.3g}"}
    return {**record, "ok": True}


def check_generation(runner: Runs, program: dict[str, Any], reference: dict[str, np.ndarray], rtol: float) -> dict[str, Any]:
    """Greedy decoding from the reference prompt against the reference tokens: a token may
    differ only at a step where the reference's top-2 margin is within the tolerance (a
    near tie), after which the sequences legitimately part and comparison stops."""
    want = [int(t) for t in reference["generate.tokens.0"]]
    margins = [float(m) for m in reference["generate.margins.0"]]
    tolerance = rtol * float(np.asarray(reference["generate.logits_range.0"]).reshape(-1)[0])
    generation = Generation(program)
    prompt = [int(t) for t in reference_prompt(reference)[0]]
    steps: list[np.ndarray] = []
    got = generation.greedy(lambda entry, args: runner.run(entry, list(args)), prompt, len(want),
                            on_step=lambda step, logits: steps.append(logits))
    record: dict[str, Any] = {"steps": len(want), "matched": 0, "tolerance": tolerance, "ok": True}
    for step, (ours, theirs) in enumerate(zip(got, want)):
        logits = steps[step]
        if not np.isfinite(logits).all():
            return {**record, "ok": False, "why": f"non-finite logits at step {step}"}
        if ours != theirs:
            if margins[step] <= tolerance:
                return {**record, "near_tie_at": step}
            return {**record, "ok": False, "why": f"step {step}: token {ours}, reference {theirs} whose margin "
                    f"{margins[step]:.3g} > tolerance {tolerance:.3g}"}
        record["matched"] = step + 1
    if len(got) != len(want):
        return {**record, "ok": False, "why": f"{len(got)} tokens, reference {len(want)}"}
    return record


def reference_cases(reference: dict[str, np.ndarray], entry: str) -> list[str]:
    """The reference runs of an entry: `ENTRY`, then `ENTRY@2`, `ENTRY@3`, ... where the
    family recorded more (a dimension left dynamic, checked at a second size)."""
    cases, k = [entry], 2
    while f"{entry}@{k}.in.0" in reference:
        cases.append(f"{entry}@{k}")
        k += 1
    return cases


def check_parity(runner: Runs, program: dict[str, Any], reference: dict[str, np.ndarray], rtol: float,
                 atol: float = 0.0) -> dict[str, Any]:
    """The parity rule (PARITY_RULE) on any runner; a JSON-able report whose `reason`
    names the entry, the output, the step and the values of the first failure. An entry
    that raises (a runtime that cannot run what was built) is a failed check, with the
    runtime's error, not a crash."""
    outputs: list[dict[str, Any]] = []
    logits_name = program.get("logits")
    for entry, io in program["entries"].items():
        for case in reference_cases(reference, entry):
            inputs = [reference[f"{case}.in.{i}"] for i in range(len(io["inputs"]))]
            try:
                got = runner.run(entry, inputs)
            except Exception as exc:  # noqa: BLE001 - TVM, ORT and RPC each raise their own kind
                if hasattr(exc, "exit_code"):  # edgec's own (an unreachable device): not the artifact's fault
                    raise
                shapes = ", ".join(f"{name} {list(x.shape)}" for name, x in zip(io["inputs"], inputs))
                outputs.append({"entry": case, "output": "*", "max_abs_diff": float("inf"), "tolerance": 0.0,
                                "argmax_mismatches": 0, "ok": False, "why": f"the runtime failed on inputs {shapes}: {one_line(exc)}"})
                continue
            for index, name in enumerate(io["outputs"]):
                outputs.append(compare_output(case, name, reference[f"{case}.out.{index}"], np.asarray(got[index]), rtol,
                                              name == logits_name, atol))
    if program["kind"] == "steps" and not any(not o["ok"] for o in outputs):
        # The parts chained on the artifact's own intermediate values, against the whole model.
        try:
            got = run_steps(runner, program, steps_inputs(program, reference))
            outputs.append(compare_output("steps", program["output"], reference["steps.out.0"], np.asarray(got), rtol, True, atol))
        except Exception as exc:  # noqa: BLE001 - as above
            if hasattr(exc, "exit_code"):
                raise
            outputs.append({"entry": "steps", "output": program["output"], "max_abs_diff": float("inf"), "tolerance": 0.0,
                            "argmax_mismatches": 0, "ok": False, "why": f"the chained steps failed: {one_line(exc)}"})
    if program["kind"] == "sample" and not any(not o["ok"] for o in outputs):
        # The whole sampler loop from the reference noise, against the reference implementation's image.
        try:
            got = Sampler(program).sample(lambda entry, args: runner.run(entry, list(args)), int(reference["sample.labels.0"][0]),
                                          reference["sample.noise.0"], int(program["steps"]), float(program["guidance_scale"]),
                                          reference.get("sample.step_noise.0"))
            outputs.append(compare_output("sample", "image", reference["sample.out.0"], got, rtol, False, atol))
        except Exception as exc:  # noqa: BLE001 - as above
            if hasattr(exc, "exit_code"):
                raise
            outputs.append({"entry": "sample", "output": "image", "max_abs_diff": float("inf"), "tolerance": 0.0,
                            "argmax_mismatches": 0, "ok": False, "why": f"the sampler loop failed: {one_line(exc)}"})
    failing = [o for o in outputs if not o["ok"]]
    generation = None
    if program["kind"] == "generate" and "generate.tokens.0" in reference and not failing:
        generation = check_generation(runner, program, reference, rtol)
    pool = failing or [o for o in outputs if o["output"] == logits_name or o["entry"] in ("steps", "sample")] or outputs
    worst = max(pool, key=lambda o: o["max_abs_diff"] / o["tolerance"] if o["tolerance"] else float("inf"))
    reason = f"{worst['entry']}.{worst['output']}: {worst['why']}" if failing else ""
    if generation is not None and not generation["ok"]:
        reason = f"greedy generation: {generation['why']}"
    return {
        "ok": not failing and (generation is None or generation["ok"]),
        "max_abs_diff": worst["max_abs_diff"],
        "tolerance": worst["tolerance"],
        "rtol": rtol,
        "atol": atol,
        "reason": reason,
        "outputs": outputs,
        "generation": generation,
        "rule": PARITY_RULE,
    }


# ----------------------------------------------------------------------------- timing
def percentiles(times_ms: list[float]) -> dict[str, float]:
    values = np.asarray(times_ms)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "std_ms": float(values.std()),
        "runs": len(times_ms),
    }


def timed(call: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Wall time (ms) of each of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_prompt(reference: dict[str, np.ndarray], length: int) -> np.ndarray:
    """The artifact's reference prompt, repeated to `length` tokens (same ids on every device)."""
    ids = reference_prompt(reference)[:1] if "generate.prompt.0" in reference else reference["prefill.in.0"][:1]
    while ids.shape[1] < length:
        ids = np.concatenate([ids, ids], axis=1)
    return np.asarray(ids[:, :length], order="C")
