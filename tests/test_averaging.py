"""Averaged checkpoints (evaluation.average): the window, the element-wise mean, its own weights id, and its
evaluation with the real hf backend into eval/<name>/average_last_<k>/."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluator.averaging import AverageError, AverageWindow, average_eval_dir, average_window, evaluate_average
from shared.protocol import Ledger, RunLayout, folder_weights_id, read_manifest, weights_id


def _ckpt(run_dir, step):
    path = RunLayout(run_dir).checkpoint_dir(step)
    return path, weights_id(read_manifest(path))


def _window(run_dir, tmp_path, steps, k=2):
    window = AverageWindow(tmp_path / "eval", k)
    for step in steps:
        path, weights = _ckpt(run_dir, step)
        window.add(step, weights, path)
    return window


def _expected_mean(folders):
    states = [load_file(f / "model.safetensors") for f in folders]
    return {
        name: (sum(s[name].to(torch.float32) for s in states) / len(states)).to(states[0][name].dtype)
        for name in states[0]
    }


def test_the_average_of_two_checkpoints_is_their_elementwise_mean(trained_run, tmp_path):
    window = _window(trained_run, tmp_path, [2, 4])
    _, steps = window.build(tmp_path / "avg")
    assert steps == [2, 4]
    got = load_file(tmp_path / "avg" / "model.safetensors")
    want = _expected_mean([_ckpt(trained_run, s)[0] for s in (2, 4)])
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    a = load_file(_ckpt(trained_run, 2)[0] / "model.safetensors")
    assert any(not torch.equal(got[n], a[n]) for n in a)  # not one of the two
    newest = _ckpt(trained_run, 4)[0]
    for name in ("config.json", "tokenizer.json"):  # the newest checkpoint's, byte for byte
        assert (tmp_path / "avg" / name).read_bytes() == (newest / name).read_bytes()
    assert not (tmp_path / "avg" / "trainer_state").exists()


def test_the_average_has_a_weights_id_of_its_own(trained_run, tmp_path):
    window = _window(trained_run, tmp_path, [2, 4])
    weights, _ = window.build(tmp_path / "avg")
    assert weights == folder_weights_id(tmp_path / "avg")  # the id of what was written
    sources = {_ckpt(trained_run, s)[1] for s in (2, 4)} | {folder_weights_id(_ckpt(trained_run, s)[0]) for s in (2, 4)}
    assert weights not in sources
    # Even the average of two identical checkpoints written by safetensors itself (the same bytes as the mean)
    # is not taken for the checkpoint.
    folder = _write(tmp_path / "same", {"w": torch.ones(4)})
    same = AverageWindow(tmp_path / "eval_same", 2)
    same.add(1, folder_weights_id(folder), folder)
    same.add(2, folder_weights_id(folder), folder)
    assert same.build(tmp_path / "avg_same")[0] != folder_weights_id(folder)


def test_the_window_keeps_only_the_k_highest_steps_in_any_order(trained_run, tmp_path):
    window = _window(trained_run, tmp_path, [6, 2, 4, 0], k=2)  # newest first, then back-filled
    assert window.steps == [4, 6]
    assert sorted(p.name for p in window.window_dir.iterdir()) == ["step_00000004", "step_00000006"]
    path, weights = _ckpt(trained_run, 2)
    assert window.add(2, weights, path) is False and window.steps == [4, 6]
    # On disk: a new window over the same folder sees the same steps (an evaluator restart).
    assert AverageWindow(tmp_path / "eval", 2).steps == [4, 6]


def test_a_checkpoint_deleted_after_add_does_not_break_the_build(trained_run, tmp_path):
    copies = {}
    window = AverageWindow(tmp_path / "eval", 2)
    for step in (2, 4):
        src, weights = _ckpt(trained_run, step)
        copies[step] = shutil.copytree(src, tmp_path / "ckpts" / src.name)
        window.add(step, weights, copies[step])
    want = _expected_mean(list(copies.values()))
    shutil.rmtree(tmp_path / "ckpts")  # the trainer's retention deleted both
    window.build(tmp_path / "avg")
    got = load_file(tmp_path / "avg" / "model.safetensors")
    assert all(torch.equal(got[n], t) for n, t in want.items())


def _write(folder, tensors):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_dtypes_are_kept_and_unequal_integer_tensors_are_an_error_naming_them(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([1, 2]), "x": torch.ones(3)}
    b = {"w": torch.tensor([2.0, 5.0], dtype=torch.bfloat16), "ids": torch.tensor([1, 2]), "x": torch.zeros(3)}
    window = AverageWindow(tmp_path / "eval", 2)
    window.add(1, "a", _write(tmp_path / "a", a))
    window.add(2, "b", _write(tmp_path / "b", b))
    window.build(tmp_path / "avg")
    got = load_file(tmp_path / "avg" / "model.safetensors")
    assert got["w"].dtype == torch.bfloat16 and got["w"].tolist() == [1.5, 3.5]
    assert torch.equal(got["ids"], torch.tensor([1, 2])) and got["x"].tolist() == [0.5] * 3
    window.add(3, "c", _write(tmp_path / "c", {**b, "ids": torch.tensor([1, 3])}))
    with pytest.raises(AverageError, match=r"tensor ids .*differs between steps 2 and 3"):
        window.build(tmp_path / "avg")
    assert load_file(tmp_path / "avg" / "model.safetensors")["w"].tolist() == [1.5, 3.5]  # the old one kept
    window.add(4, "d", _write(tmp_path / "d", {"w": b["w"], "ids": b["ids"]}))
    with pytest.raises(AverageError, match="tensor x: in one of steps"):
        window.build(tmp_path / "avg")


def _evaluator(cfg):
    from evaluator.backends import make_backend
    from evaluator.evaluation import Evaluator

    return Evaluator(cfg, make_backend(cfg.evaluation, False), None)


def test_an_average_is_evaluated_with_the_hf_backend_into_its_own_folder(run_copy, make_config):
    from shared.config import load_config

    cfg = load_config(make_config({"evaluation": {"average": {"last": 2}}}), [])
    eval_dir = RunLayout(run_copy).eval_dir("default")
    assert average_window(load_config(make_config(), []), eval_dir) is None  # off by default
    window = average_window(cfg, eval_dir)
    evaluator = _evaluator(cfg)
    calls = []
    real_evaluate = evaluator.evaluate
    evaluator.evaluate = lambda *a: calls.append(a) or real_evaluate(*a)
    try:
        path, w2 = _ckpt(run_copy, 2)
        window.add(2, w2, path)
        assert evaluate_average(evaluator, window, eval_dir, 2) is None  # one checkpoint: no average yet
        path, w4 = _ckpt(run_copy, 4)
        window.add(4, w4, path)
        result_path = evaluate_average(evaluator, window, eval_dir, 4)
        assert evaluate_average(evaluator, window, eval_dir, 4) == result_path  # recorded once, not again
    finally:
        evaluator.close()
    avg_dir = average_eval_dir(eval_dir, 2)
    assert result_path == avg_dir / "step_00000004.json" and len(calls) == 1
    result = json.loads(result_path.read_text())
    assert result["average"] == {"last": 2, "steps": [2, 4], "weights_ids": [w2, w4]}
    assert result["step"] == 4 and result["weights_id"] not in (w2, w4)
    assert result["weights_id"] == folder_weights_id(eval_dir / "average" / "model")
    assert result["sets"]["main"]["metrics"]["accuracy"] is not None
    assert (avg_dir / "main" / "step_00000004.samples.jsonl").is_file()
    entry = Ledger(avg_dir).read()[4]
    assert entry["status"] == "done" and entry["weights_id"] == result["weights_id"]
    assert not (eval_dir / "step_00000004.json").exists()  # the checkpoints' own results are untouched


@pytest.mark.parametrize("name", ["average", "average_last_3"])
def test_a_set_may_not_take_the_name_of_the_averages_folders(make_config, name):
    from shared.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"evaluation.sets: .*got '{name}'"):
        load_config(make_config({"evaluation": {"sets": {name: {}}}}), [])


def test_the_serving_loop_evaluates_the_average_each_recorded_step_completes(run_copy, make_config):
    """serve_run wires the window in: every recorded step joins it (from its snapshot) and completes an average."""
    from evaluator.serving import serve_run
    from shared.config import load_config

    cfg = load_config(make_config({"evaluation": {"average": {"last": 2}}}), [])
    layout = RunLayout(run_copy)
    evaluator = _evaluator(cfg)
    try:
        assert serve_run(cfg, layout, evaluator, once=True, force=False) == 0
    finally:
        evaluator.close()
    eval_dir = layout.eval_dir("default")
    averaged = {
        int(p.stem.split("_")[1]): json.loads(p.read_text())["average"]["steps"]
        for p in average_eval_dir(eval_dir, 2).glob("step_*.json")
    }
    steps = sorted(json.loads(p.read_text())["step"] for p in eval_dir.glob("step_*.json"))
    assert averaged == {new: [old, new] for old, new in itertools.pairwise(steps)}
    assert not list((eval_dir / "snapshots").glob("*"))  # the window holds links of its own, snapshots are gone
