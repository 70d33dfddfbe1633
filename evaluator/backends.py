"""Generation engines. One engine per evaluator process, created once; checkpoints are swapped in.

Both backends take the same sampling settings and return the same `Generation`s, so metrics do not
depend on the backend beyond sampling noise. The engine is rebuilt only when a checkpoint's
architecture or tokenizer differs from the loaded one (`model_signature`).

Generation is watched: it runs in a worker thread while the caller's thread waits for its progress (a token step
with hf, a finished request with vllm). Progress restarts a deadline of evaluation.generate_timeout_s; when the
deadline passes the engine is taken for hung: it is killed (vllm: its engine-core processes) or abandoned (hf: the
worker thread, told to stop at its next token step), the backend is closed so that the next load() builds a new
engine, and generate raises GenerateTimeout. vLLM's in-place reload and fingerprint run under the same deadline
(a stuck collective hangs them as well).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from shared import procfs
from shared.config import EvalSetConfig, EvaluationConfig
from shared.errors import UserError
from shared.hf_models import tied_weight_names

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.26.",)
"""vLLM versions whose in-place reload (collective_rpc reload_weights) this code was checked with."""

_FAULT_GENERATE_HANG_ENV = "MATH_SFT_FAULT_GENERATE_HANG"
"""Tests: the first <k> generate calls of this process block forever, before any progress (a wedged engine)."""
_FAULT_GENERATE_DELAY_ENV = "MATH_SFT_FAULT_GENERATE_DELAY_S"
"""Tests: every generate call first sleeps this many seconds (a slow evaluator). The sleep counts as no progress:
a delay at or past evaluation.generate_timeout_s trips the watchdog, a shorter one does not."""
_GENERATE_CALLS = itertools.count()
"""generate calls of this process, for the hang fault hook."""

TICK_INTERVAL_S = 1.0
"""hf: at most one progress tick per this many seconds from the token steps (the deadline needs no more)."""

T = TypeVar("T")


class EngineError(UserError, RuntimeError):
    """The engine could not load or run a checkpoint; the message names the path."""


class GenerateTimeout(EngineError):
    """generate made no progress for evaluation.generate_timeout_s: the engine was killed and the backend closed
    (the next load builds a new engine)."""


def _injected_generate_faults(call: int) -> None:
    """The one reader of the generate fault hooks; runs where the generation runs, inside the watched region."""
    delay_s = float(os.environ.get(_FAULT_GENERATE_DELAY_ENV) or 0)
    if delay_s > 0:
        time.sleep(delay_s)
    if call < int(os.environ.get(_FAULT_GENERATE_HANG_ENV) or 0):
        log.warning("fault injection (%s): generate call %d hangs", _FAULT_GENERATE_HANG_ENV, call + 1)
        threading.Event().wait()  # never set: blocks forever, like a wedged engine


def with_generate_faults(work: Callable[[Callable[[int], None]], T]) -> Callable[[Callable[[int], None]], T]:
    """`work` as one generate call of this process: the fault hooks run first, inside whatever deadline runs it."""
    call = next(_GENERATE_CALLS)

    def faulty(tick: Callable[[int], None]) -> T:
        _injected_generate_faults(call)
        return work(tick)

    return faulty


def run_watched(
    work: Callable[[Callable[[int], None]], T],
    progress: Callable[[int], None] | None,
    timeout_s: float,
    what: str = "generate",
) -> T:
    """`work(tick)` in a daemon thread while this thread waits. Each `tick(n)` from it restarts the deadline and
    reaches `progress(n)` in this thread (n: requests finished, 0 for a token step); what work returns or raises
    is returned or raised here. No tick for `timeout_s`: GenerateTimeout naming `what`, and the thread is
    abandoned (the caller kills or stops what it runs)."""
    events: queue.SimpleQueue = queue.SimpleQueue()

    def target() -> None:
        try:
            events.put(("done", work(lambda n: events.put(("tick", n)))))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            events.put(("error", exc))

    threading.Thread(target=target, name="generate", daemon=True).start()
    while True:
        try:
            kind, value = events.get(timeout=timeout_s)
        except queue.Empty:
            raise GenerateTimeout(
                f"{what} made no progress for {timeout_s:g} s (evaluation.generate_timeout_s): "
                "the engine is taken for hung, killed and built again"
            ) from None
        if kind == "error":
            raise value
        if kind == "done":
            return value
        if progress is not None:
            progress(value)


@dataclass
class Generation:
    text: str
    num_tokens: int
    truncated: bool
    """Stopped by max_tokens rather than a stop string or end of sequence."""


def model_signature(ckpt_dir: Path) -> str:
    """Architecture + tokenizer identity: equal signatures can swap weights in place."""
    config = json.loads((ckpt_dir / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        if (ckpt_dir / name).is_file():
            h.update(name.encode() + (ckpt_dir / name).read_bytes())
    return h.hexdigest()[:16]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to and including the first stop string; whether one was found."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, False
    pos, stop = min(hits)
    return text[: pos + len(stop)], True


class HFBackend:
    """transformers `generate`, batched, left-padded. For CPUs and machines without vLLM."""

    name = "hf"

    def __init__(self, cfg: EvaluationConfig, trust_remote_code: bool):
        import torch

        self.cfg = cfg
        self.trust_remote_code = trust_remote_code
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.model = None
        self.tokenizer = None
        self.signature: str | None = None

    def load(self, ckpt_dir: Path) -> str:
        """Load `ckpt_dir`; returns 'in-place' or 'new-engine'."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        signature = model_signature(ckpt_dir)
        try:
            if signature == self.signature:
                state = _read_safetensors(ckpt_dir)
                missing, unexpected = self.model.load_state_dict(state, strict=False)
                real_missing = [m for m in missing if m not in tied_weight_names(self.model)]
                if real_missing or unexpected:
                    raise EngineError(
                        f"{ckpt_dir}: weights do not match the loaded model "
                        f"(missing {real_missing[:3]}, unexpected {unexpected[:3]})"
                    )
                return "in-place"
            self.tokenizer = AutoTokenizer.from_pretrained(
                ckpt_dir, trust_remote_code=self.trust_remote_code, padding_side="left"
            )
            if self.tokenizer.pad_token is None:  # batched generation pads; many base models define no pad token
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = (
                AutoModelForCausalLM.from_pretrained(
                    ckpt_dir, dtype=self.dtype, use_safetensors=True, trust_remote_code=self.trust_remote_code
                )
                .to(self.device)
                .eval()
            )
            self.signature = signature
            return "new-engine"
        except EngineError:
            self.signature = None
            raise
        except Exception as exc:  # loaders raise many types (OSError, SafetensorError...): all mean "cannot load"
            self.signature = None
            raise EngineError(f"{ckpt_dir}: cannot load model: {exc}") from exc

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        sampling: EvalSetConfig,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """One response per prompt. transformers samples a batch from one random stream: each batch is
        seeded with its first request's seed, so the same prompts, seeds and hf_batch_size give the same
        responses (reproducible across restarts; not per request, as with vLLM). Watched (the module's
        docstring): `progress(n)` after each batch of n prompts, `progress(0)` for token steps in between."""
        if self.model is None:
            raise EngineError("hf backend: generate called with no model loaded")
        model, tok, cancelled = self.model, self.tokenizer, threading.Event()
        try:
            return run_watched(
                with_generate_faults(
                    lambda tick: self._generate_batches(model, tok, prompts, seeds, sampling, tick, cancelled)
                ),
                progress,
                self.cfg.generate_timeout_s,
            )
        except GenerateTimeout:
            log.warning(
                "hf generate hung: its thread is abandoned (it stops at its next token step), the model dropped"
            )
            self.close()
            raise
        finally:
            cancelled.set()  # a worker left behind (timed out, or its caller interrupted) stops at its next token step

    def _generate_batches(self, model, tok, prompts, seeds, sampling, tick, cancelled) -> list[Generation]:
        """The generation itself, in the watched worker thread (with its own no_grad: grad mode is per thread)."""
        import torch

        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        options = (
            {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.temperature > 0
            else {"do_sample": False}
        )
        from transformers import StoppingCriteriaList

        ticks = StoppingCriteriaList([_token_ticks_class()(tick, cancelled)])
        results: list[Generation] = []
        for i in range(0, len(prompts), self.cfg.hf_batch_size):
            if cancelled.is_set():
                break
            batch = prompts[i : i + self.cfg.hf_batch_size]
            torch.manual_seed(seeds[i])
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=sampling.max_tokens,
                    stop_strings=sampling.stop or None,
                    stopping_criteria=ticks,
                    tokenizer=tok,
                    pad_token_id=pad_id,
                    eos_token_id=tok.eos_token_id,
                    **options,
                )
            results.extend(_decode_rows(tok, out[:, enc["input_ids"].shape[1] :], pad_id, sampling))
            tick(len(batch))
        return results

    def fingerprint(self, prompt: str) -> list[float]:
        """Log-probs the model gives the tokens of `prompt`: changes whenever the weights change."""
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        with torch.no_grad():
            logp = torch.log_softmax(self.model(ids).logits.float(), dim=-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        return [round(float(x), 6) for x in logp[:32]]

    def close(self) -> None:
        """Drop the engine; the next load builds a new one."""
        self.model = None
        self.signature = None


def _decode_rows(tok, new_ids, pad_id: int, sampling: EvalSetConfig) -> list[Generation]:
    """The responses of one batch from its generated ids (prompt removed)."""
    results = []
    for row in new_ids:
        ids = row.tolist()
        # Generation ends at EOS or pad; both are outside the response.
        for end, t in enumerate(ids):
            if t in (pad_id, tok.eos_token_id):
                ids = ids[:end]
                ended = True
                break
        else:
            ended = False
        text, stopped = cut_at_stop(tok.decode(ids, skip_special_tokens=True), sampling.stop)
        results.append(Generation(text, len(ids), truncated=not (stopped or ended) and len(ids) >= sampling.max_tokens))
    return results


@functools.cache
def _token_ticks_class():
    """transformers' StoppingCriteria that ticks the watchdog (imported late: torch and transformers are heavy)."""
    import torch
    from transformers import StoppingCriteria

    class TokenTicks(StoppingCriteria):
        """Called after every token step: ticks at most every TICK_INTERVAL_S, and stops the whole batch once
        `cancelled` is set (never otherwise, so the samples are those of an unwatched generate)."""

        def __init__(self, tick: Callable[[int], None], cancelled: threading.Event):
            self.tick, self.cancelled, self.last = tick, cancelled, time.monotonic()

        def __call__(self, input_ids, scores, **kwargs):
            now = time.monotonic()
            if now - self.last >= TICK_INTERVAL_S:
                self.last = now
                self.tick(0)
            stop = self.cancelled.is_set()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return TokenTicks


def _read_safetensors(ckpt_dir: Path):
    from safetensors.torch import load_file

    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{ckpt_dir}: no .safetensors weights (only safetensors are loaded, for safety)")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


class VLLMBackend:
    """One persistent vLLM engine (its core in a child process by default); new checkpoints are reloaded into it
    in place."""

    name = "vllm"

    def __init__(self, cfg: EvaluationConfig, trust_remote_code: bool, num_gpus: int):
        # evaluation.vllm_engine_process decides where the engine core runs (a child process was measured faster
        # on H100: 0.93x raw generate against 0.84x in-process), over the environment (the GPU kit's install
        # script exports 0). vLLM reads the variable when an engine is built; only an in-process engine caches it.
        # FlashInfer's sampler is not always installed.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.vllm_engine_process == "child" else "0"
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        # Children are spawned, never forked: this process has threads (heartbeat, watcher, grader pipes), and a
        # forked engine core hung at start-up after "Using V2 Model Runner" (seen on H200, 2026-11-26).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(
                f"evaluation.backend=vllm but vLLM cannot be imported ({exc}); "
                "install the 'vllm' extra or use backend=hf"
            ) from None
        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            raise EngineError(
                f"vLLM {vllm.__version__} is not supported (supported: {', '.join(v + 'x' for v in SUPPORTED_VLLM)}); "
                "its in-place weight reload differs between versions"
            )
        self.vllm = vllm
        self.cfg = cfg
        self.trust_remote_code = trust_remote_code
        self.num_gpus = num_gpus
        self.llm = None
        self.signature: str | None = None
        self._engine_pids: set[int] = set()
        """The engine core's processes (children started while the engine was built): killed if it hangs."""

    def _max_model_len(self, ckpt_dir: Path) -> int:
        if self.cfg.max_model_len:
            return self.cfg.max_model_len
        config = json.loads((ckpt_dir / "config.json").read_text())
        limit = config.get("max_position_embeddings") or 4096
        max_tokens = max(s.max_tokens for s in self.cfg.eval_sets())
        return min(limit, max(1024, -(-(max_tokens + 1024) // 256) * 256))

    def _start_engine(self, ckpt_dir: Path):
        """A new engine; its core in a child process unless in-process was chosen. A child that fails to
        start, or hangs (vLLM itself waits for it without a deadline), is killed after
        engine_start_timeout_s, and the engine is built in this process instead, with a warning."""

        def build():
            return self.vllm.LLM(
                model=str(ckpt_dir),
                tokenizer=str(ckpt_dir),
                dtype="bfloat16",
                seed=self.cfg.seed,
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                max_model_len=self._max_model_len(ckpt_dir),
                tensor_parallel_size=self.num_gpus,
                trust_remote_code=self.trust_remote_code,
                enable_prefix_caching=True,
                load_format="safetensors",
                # every batch the engine may run has a CUDA graph (past the largest one it runs without)
                max_num_seqs=self.cfg.vllm_max_num_seqs,
                compilation_config={"max_cudagraph_capture_size": self.cfg.vllm_max_num_seqs},
            )

        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            return build()
        deadline = ChildDeadline(self.cfg.engine_start_timeout_s)
        try:
            with deadline:
                return build()
        except Exception as exc:  # vLLM raises many types
            # Only a child that hung or died falls back; a model that cannot load stays an error (EngineError).
            if not (deadline.expired or "Engine core initialization failed" in str(exc)):
                raise
            why = f"did not start within {self.cfg.engine_start_timeout_s:g}s" if deadline.expired else str(exc)
            log.warning(
                "vLLM's engine in a child process failed (%s); running it in this process from now on "
                "(evaluation.vllm_engine_process=in-process skips the try)",
                why.splitlines()[0] if why else "no reason",
            )
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            return build()

    def load(self, ckpt_dir: Path) -> str:
        signature = model_signature(ckpt_dir)
        try:
            if self.llm is not None and signature == self.signature:
                llm = self.llm  # a stuck collective is a hung engine too: killed after generate_timeout_s
                self._watched(
                    lambda tick: llm.collective_rpc("reload_weights", kwargs={"weights_path": str(ckpt_dir)}),
                    "reloading the weights",
                )
                # Cached KV blocks were computed with the old weights.
                self.llm.reset_prefix_cache()
                return "in-place"
            self.close()
            before = set(child_pids())
            self.llm = self._start_engine(ckpt_dir)
            self._engine_pids = set(child_pids()) - before
            self.signature = signature
            return "new-engine"
        except EngineError:
            raise
        except Exception as exc:  # vLLM raises many types; all mean "cannot load"
            self.signature = None
            raise EngineError(f"{ckpt_dir}: vLLM cannot load it: {exc}") from exc

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        sampling: EvalSetConfig,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """One response per prompt, request i sampled with noise seeded by seeds[i]: the same requests
        submitted together give the same samples whatever the engine ran before (a restarted evaluator does
        that). Another batch around them changes the bf16 logits slightly, so long samples can then differ
        (BENCHMARKS.md); the evaluator therefore calls it once per set, so that adding a set never changes
        another's samples (one call for all sets was measured no faster: 0.98x). Seeds cost 1-17 % of raw
        generation in vLLM 0.26 (measured on H100 and H200). Watched (the module's docstring): `progress(n)` as
        requests finish, through the progress bar vLLM accepts as a factory (use_tqdm)."""
        if self.llm is None:
            raise EngineError("vllm backend: generate called with no engine loaded")
        llm, params = self.llm, self.sampling_params(seeds, sampling)
        try:
            outputs = self._watched(
                with_generate_faults(
                    lambda tick: llm.generate(prompts, params, use_tqdm=functools.partial(_TickBar, tick=tick))
                ),
                "generate",
                progress,
            )
        except GenerateTimeout:  # the engine is killed already: not one more failure to wrap
            raise
        except Exception as exc:  # e.g. a tensor-parallel worker died
            self.close()  # the next checkpoint starts a fresh engine
            raise EngineError(
                f"vLLM engine failed while generating ({type(exc).__name__}: {exc}); it will be restarted"
            ) from exc
        if len(outputs) != len(prompts):  # every response is matched to its request by position
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} requests")
        results = []
        for out in outputs:
            c = out.outputs[0]
            text, _ = cut_at_stop(c.text, sampling.stop)
            results.append(Generation(text, len(c.token_ids), truncated=c.finish_reason == "length"))
        return results

    def sampling_params(self, seeds: list[int], sampling: EvalSetConfig) -> list:
        """vLLM's SamplingParams of each request `generate` submits."""
        return [
            self.vllm.SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=sampling.stop or None,
                include_stop_str_in_output=True,
                seed=seed if sampling.temperature > 0 else None,
            )
            for seed in seeds
        ]

    def _watched(self, work, what: str, progress: Callable[[int], None] | None = None):
        """`run_watched` on this engine: past the deadline the engine is killed and GenerateTimeout raised."""
        try:
            return run_watched(work, progress, self.cfg.generate_timeout_s, what)
        except GenerateTimeout:
            self._kill_engine()
            raise

    def fingerprint(self, prompt: str) -> list[float]:
        llm = self.llm
        tok = llm.get_tokenizer()
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        out = self._watched(
            lambda tick: llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False), "a fingerprint"
        )[0]
        return [round(float(d[t].logprob), 6) for d, t in zip(out.prompt_logprobs[1:33], ids[1:33], strict=False)]

    def close(self) -> None:
        """Shut the engine down; the next load builds a new one."""
        llm, self.llm, self.signature, self._engine_pids = self.llm, None, None, set()
        _shutdown(llm)

    def _kill_engine(self) -> None:
        """A hung engine: SIGKILL its engine-core processes (and theirs), then forget it; the next load builds a new
        one. Its shutdown runs in a thread of its own: it may wait on what was killed, never the evaluator."""
        killed = kill_process_tree(self._engine_pids)
        if killed:
            log.warning("vLLM generate hung: killed its engine-core processes %s", " ".join(map(str, killed)))
        else:
            log.warning(
                "vLLM generate hung and its engine runs in this process: it cannot be killed and its GPU memory stays "
                "held, so the next engine may not fit (evaluation.vllm_engine_process=child avoids this)"
            )
        llm, self.llm, self.signature, self._engine_pids = self.llm, None, None, set()
        threading.Thread(target=_shutdown, args=(llm,), name="engine-shutdown", daemon=True).start()


def _shutdown(llm) -> None:
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort: the engine may be dead already
        log.debug("vLLM engine shutdown failed", exc_info=True)


class _Discard:
    """A file that drops what is written (the watchdog's progress bar draws nothing)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _TickBar(tqdm):
    """vLLM's progress bar, made by the factory generate passes as use_tqdm: each update (finished requests) ticks
    the watchdog. It draws nothing."""

    def __init__(self, *args: Any, tick: Callable[[int], None], **kwargs: Any):
        self._tick = tick
        kwargs.setdefault("file", _Discard())
        kwargs["disable"] = False  # over TQDM_DISABLE: a disabled bar neither counts nor has the format_dict vLLM reads
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._tick(int(n or 0))
        return shown


class ChildDeadline:
    """`with ChildDeadline(t):` if the block runs longer than t seconds, every child process started since it
    began (and any started later, until it ends) is killed: code that waits without a deadline for a child
    that hangs (vLLM waiting for its engine core) then fails instead of hanging. `expired` says it happened."""

    POLL_S = 0.2

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.expired = False
        self._done = threading.Event()

    def __enter__(self) -> ChildDeadline:
        self._before = set(child_pids())
        self._thread = threading.Thread(target=self._watch, name="child-deadline", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        self.expired = True
        while not self._done.is_set():
            for pid in set(child_pids()) - self._before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._done.wait(self.POLL_S)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def child_pids() -> list[int]:
    """Processes whose parent is this one."""
    return procfs.child_pids(os.getpid())


def kill_process_tree(roots: set[int]) -> list[int]:
    """SIGKILL the processes `roots` that still exist and all their descendants; the pids killed."""
    parent_of = procfs.parent_pids()
    tree = {pid for pid in roots if pid in parent_of}
    while grown := {pid for pid, parent in parent_of.items() if parent in tree} - tree:
        tree |= grown
    killed = []
    for pid in sorted(tree):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def vllm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def make_backend(cfg: EvaluationConfig, trust_remote_code: bool):
    import torch

    num_gpus = torch.cuda.device_count()
    choice = cfg.backend
    if choice == "auto":
        choice = "vllm" if num_gpus > 0 and vllm_available() else "hf"
    if choice == "vllm":
        if num_gpus == 0:
            raise EngineError("evaluation.backend=vllm needs a GPU and none is visible; use evaluation.backend=hf")
        return VLLMBackend(cfg, trust_remote_code, num_gpus)
    return HFBackend(cfg, trust_remote_code)
