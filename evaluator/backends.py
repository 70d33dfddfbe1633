"""Generation engines. One engine per evaluator process, created once; checkpoints are swapped in.

Both backends take the same sampling settings and return the same `Generation`s, so metrics do not
depend on the backend beyond sampling noise. The engine is rebuilt only when a checkpoint's
architecture or tokenizer differs from the loaded one (`model_signature`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared.config import EvalSetConfig, EvaluationConfig
from shared.hf_models import tied_weight_names
from shared.protocol import proc_stat

SUPPORTED_VLLM = ("0.26.",)
"""vLLM versions whose in-place reload (collective_rpc reload_weights) this code was checked with."""


class EngineError(RuntimeError):
    """The engine could not load or run a checkpoint; the message names the path."""


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
                        f"{ckpt_dir}: weights do not match the loaded model (missing {real_missing[:3]}, unexpected {unexpected[:3]})"
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
        except Exception as exc:  # noqa: BLE001 - loaders raise many types (OSError, SafetensorError...): all mean "cannot load"
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
        responses (reproducible across restarts; not per request, as with vLLM)."""
        import torch

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        options = (
            dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.temperature > 0
            else dict(do_sample=False)
        )
        results = []
        for i in range(0, len(prompts), self.cfg.hf_batch_size):
            batch = prompts[i : i + self.cfg.hf_batch_size]
            torch.manual_seed(seeds[i])
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=sampling.max_tokens,
                    stop_strings=sampling.stop or None,
                    tokenizer=tok,
                    pad_token_id=pad_id,
                    eos_token_id=tok.eos_token_id,
                    **options,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for row in new:
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
                results.append(
                    Generation(text, len(ids), truncated=not (stopped or ended) and len(ids) >= sampling.max_tokens)
                )
            if progress:
                progress(len(batch))
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
                f"evaluation.backend=vllm but vLLM cannot be imported ({exc}); install the 'vllm' extra or use backend=hf"
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
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types
            # Only a child that hung or died falls back; a model that cannot load stays an error (EngineError).
            if not (deadline.expired or "Engine core initialization failed" in str(exc)):
                raise
            why = f"did not start within {self.cfg.engine_start_timeout_s:g}s" if deadline.expired else str(exc)
            print(
                f"warning: vLLM's engine in a child process failed ({why.splitlines()[0] if why else 'no reason'}); "
                "running it in this process from now on (evaluation.vllm_engine_process=in-process skips the try)"
            )
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            return build()

    def load(self, ckpt_dir: Path) -> str:
        signature = model_signature(ckpt_dir)
        try:
            if self.llm is not None and signature == self.signature:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(ckpt_dir)})
                # Cached KV blocks were computed with the old weights.
                self.llm.reset_prefix_cache()
                return "in-place"
            self.close()
            self.llm = self._start_engine(ckpt_dir)
            self.signature = signature
            return "new-engine"
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types; all mean "cannot load"
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
        generation in vLLM 0.26 (measured on H100 and H200)."""
        try:
            outputs = self.llm.generate(prompts, self.sampling_params(seeds, sampling), use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - e.g. a tensor-parallel worker died
            self.close()  # the next checkpoint starts a fresh engine
            raise EngineError(
                f"vLLM engine failed while generating ({type(exc).__name__}: {exc}); it will be restarted"
            ) from exc
        if len(outputs) != len(prompts):  # every response is matched to its request by position
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} requests")
        if progress:
            progress(len(prompts))
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

    def fingerprint(self, prompt: str) -> list[float]:
        tok = self.llm.get_tokenizer()
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out = self.llm.generate(
            [{"prompt_token_ids": ids}], self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )[0]
        return [round(float(d[t].logprob), 6) for d, t in zip(out.prompt_logprobs[1:33], ids[1:33])]

    def close(self) -> None:
        """Shut the engine down; the next load builds a new one."""
        self.signature = None
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
            self.llm = None


class ChildDeadline:
    """`with ChildDeadline(t):` if the block runs longer than t seconds, every child process started since it
    began (and any started later, until it ends) is killed: code that waits without a deadline for a child
    that hangs (vLLM waiting for its engine core) then fails instead of hanging. `expired` says it happened."""

    POLL_S = 0.2

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.expired = False
        self._done = threading.Event()

    def __enter__(self) -> "ChildDeadline":
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
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._done.wait(self.POLL_S)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def child_pids() -> list[int]:
    """Processes whose parent is this one (Linux /proc; field 4 of stat is the parent's pid)."""
    me = str(os.getpid())
    return [
        int(entry.name)
        for entry in os.scandir("/proc")
        if entry.name.isdigit() and (fields := proc_stat(entry.name)) is not None and fields[1] == me
    ]


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
