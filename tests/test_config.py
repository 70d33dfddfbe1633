import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.prompt_template_path().is_file()
    # The resolved config round-trips: the copy the trainer writes into a run directory reads back the same.
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(saved) == cfg


def test_real_recipe_has_reference_defaults():
    cfg = load_config(REPO / "config" / "qwen2.5-math-1.5b.yaml")
    assert cfg.model.path.endswith("Qwen2.5-Math-1.5B")
    assert cfg.training.learning_rate == 2e-5
    assert cfg.training.eval_every == 500
    assert cfg.training.gpus == [0] and cfg.evaluation.gpus == [1]
    assert (
        cfg.evaluation.num_samples is None and cfg.evaluation.data.path == "data/math500/test.jsonl"
    )  # all of MATH-500
    assert (cfg.evaluation.temperature, cfg.evaluation.top_p, cfg.evaluation.max_tokens) == (1.0, 1.0, 1024)
    assert cfg.evaluation.stop == ["</answer>"]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "training:\n  learning_rat: 0.1\n"))
    assert "unknown key 'training.learning_rat'" in str(e.value)
    assert "did you mean 'training.learning_rate'" in str(e.value)
    assert str(tmp_path / "c.yaml") in str(e.value)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'.*did you mean 'training'"):
        load_config(write(tmp_path, "trainig: {}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("training:\n  max_steps: ten\n", r"training.max_steps: expected int, got 'ten'"),
        ("training:\n  max_steps: 0\n", r"training.max_steps: must be > 0, got 0"),
        (
            "training:\n  batch_size: 10\n  micro_batch_size: 4\n",
            r"training.batch_size \(10\) must be a multiple of training.micro_batch_size \(4\)",
        ),
        ("evaluation:\n  backend: tpu\n", r"evaluation.backend: must be one of auto, vllm, hf; got 'tpu'"),
        ("evaluation:\n  top_p: 1.5\n", r"evaluation.top_p: must be in \(0, 1\], got 1.5"),
        ("training:\n  gpus: [0, 0]\n", r"training.gpus: must be a non-empty list of distinct GPU indices"),
        ("wandb:\n  mode: loud\n", r"wandb.mode: must be one of"),
        ("model: 3\n", r"model: expected a mapping of settings, got 3"),
        ("evaluation:\n  sets: {a: {nn: 3}}\n", r"unknown key 'evaluation.sets.a.nn'; did you mean 'n'\?"),
        ("evaluation:\n  sets: {a: {n: 4, temperature: 0}}\n", r"evaluation.sets.a.n: 4 samples at temperature 0"),
        ("evaluation:\n  sets: {wandb: {}}\n", r"a set name must be a plain folder name, not wandb"),
        ("evaluation:\n  sets: {snapshots: {}}\n", r"a set name must be a plain folder name, not .*snapshots"),
        ("evaluation:\n  max_attempts: 0\n", r"evaluation.max_attempts: must be > 0, got 0"),
        ("evaluation:\n  generate_timeout_s: 0\n", r"evaluation.generate_timeout_s: must be > 0, got 0"),
        (
            "evaluation:\n  heartbeat_timeout_s: 600\n",
            r"evaluation.heartbeat_timeout_s: must exceed evaluation.generate_timeout_s \(600 s\)",
        ),
        (
            "evaluation:\n  heartbeat_timeout_s: 100\n  generate_timeout_s: 30\n",
            r"evaluation.heartbeat_timeout_s: must exceed evaluation.engine_start_timeout_s \(300 s\)",
        ),
        ("evaluation:\n  sets: {a: {data: {pat: x}}}\n", r"unknown key 'evaluation.sets.a.data.pat'"),
        ("training:\n  keep_best: {set: b}\n", r"training.keep_best.set: no evaluation set 'b'; the sets: main"),
        (
            "training:\n  keep_best: {metric: pass@8}\nevaluation:\n  n: 4\n  temperature: 1\n",
            r"training.keep_best.metric: 'pass@8' is not reported for set 'main' \(n=4\); rank by one of .*pass@4",
        ),
        ("training:\n  keep_best: {metric: mean_response_tokens}\n", r"'mean_response_tokens' is not reported"),
    ],
)
def test_bad_values_name_key_and_value(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_sets_take_what_they_leave_out_from_the_evaluation_section(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "evaluation:\n  temperature: 0.6\n  max_tokens: 99\n  data: {path: a.jsonl, format: math}\n"
            "  sets:\n    x: {n: 4}\n    y: {data: {path: b.jsonl}, temperature: 1.0, num_samples: null}\n",
        )
    )
    x, y = cfg.evaluation.eval_sets()
    assert (x.name, x.n, x.temperature, x.max_tokens, x.data.path, x.num_samples) == ("x", 4, 0.6, 99, "a.jsonl", 100)
    assert (y.n, y.temperature, y.data.path, y.data.format, y.num_samples) == (1, 1.0, "b.jsonl", "math", None)
    assert [s.name for s in load_config(write(tmp_path, "run_name: r\n")).evaluation.eval_sets()] == ["main"]


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(
        write(tmp_path, ""),
        ["training.learning_rate=1e-5", "evaluation.stop=['</answer>', 'END']", "wandb.mode=disabled"],
    )
    assert cfg.training.learning_rate == 1e-5
    assert cfg.evaluation.stop == ["</answer>", "END"]
    with pytest.raises(ConfigError, match=r"unknown key 'training\.lr'"):
        load_config(write(tmp_path, ""), ["training.lr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, ""), ["training.learning_rate"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [\n"))


def test_hash_changes_with_content():
    a, b = Config(), Config()
    assert a.hash() == b.hash()
    b.training.learning_rate = 1.0
    assert a.hash() != b.hash()


def test_config_and_protocol_import_without_torch_or_vllm():
    code = (
        "import sys; import shared.config, shared.protocol, shared.data, shared.launch, shared.tracking, "
        "evaluator.scheduler, evaluator.watcher; "
        "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]; print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shared_imports_neither_service():
    """shared/ is the common package: it may import neither the trainer nor the evaluator (nor torch or vllm)."""
    import ast

    offenders = []
    for path in sorted((REPO / "shared").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] in ("trainer", "evaluator", "demo", "torch", "vllm")
            ]
    assert offenders == []


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^override 'training.lerning_rate=1e-5': unknown key 'training.lerning_rate'; did you mean"
    ):
        load_config(None, ["training.lerning_rate=1e-5"])
    with pytest.raises(ConfigError, match=r"^override 'training.max_steps=0': training.max_steps: must be > 0"):
        load_config(None, ["training.max_steps=0"])
    with pytest.raises(
        ConfigError, match=r"c.yaml: training.max_steps: must be > 0"
    ):  # an error in the file names the file
        bad = tmp_path / "c.yaml"
        bad.write_text("training: {max_steps: 0}\n")
        load_config(bad, ["training.learning_rate=1e-5"])
