"""The offline demo learns: accuracy above the majority-class rate, several distinct answers, the
forced-bottleneck signature; and the same checks reject a constant predictor."""
import json

import pytest

from livr_model.app import probes as probes_module
from livr_model.app import checkpoints as ckpt
from livr_model.app.cli import eval_main, train_main
from livr_model.app.data import prepare_data
from livr_model.app.demo import CURVES_FILE, TRAINING_LOG_FILE
from livr_model.app.models import load_trained
from livr_model.app.probes import SIGNATURE_MARGIN, evaluate_model, learning_verdict

# The small demo's margins: it must beat always-the-most-common-answer by this much.
MAJORITY_MARGIN = 0.15
MIN_DISTINCT = 3


def check_demo_learned(metrics: dict) -> None:
    """Raise AssertionError unless ``metrics`` show a model that learned, with the mechanism signature."""
    accuracy = metrics["accuracy"]["average"]
    majority = max(metrics["majority"].values())
    chance = max(metrics["chance"].values())
    distinct = {r["prediction"] for r in metrics["predictions"] if r["prediction"] is not None}
    forced = metrics["probes"]["bottleneck_forced"]["average"]
    assert accuracy >= majority + MAJORITY_MARGIN, f"accuracy {accuracy:.3f} is not {MAJORITY_MARGIN} above the majority rate {majority:.3f}"
    assert len(distinct) >= MIN_DISTINCT, f"only {sorted(distinct)} predicted"
    assert forced >= chance + SIGNATURE_MARGIN, f"bottleneck-forced accuracy {forced:.3f} is not {SIGNATURE_MARGIN} above chance {chance:.3f}"
    assert learning_verdict(metrics).learned


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = train_main(["--demo", "--demo-size", "small", "--output-dir", str(out), "--no-progress"])
    return out, code


@pytest.mark.slow
def test_small_demo_learns_with_the_signature(small_demo, capsys):
    out, code = small_demo
    metrics = json.loads((out / "metrics.json").read_text())
    check_demo_learned(metrics)
    assert code == 0 and metrics["verdict"]["learned"] and "LEARNED" in metrics["verdict"]["text"]
    probes = metrics["probes"]
    assert 0.0 < probes["answer_to_latent_attention"] < 1.0
    assert probes["latents_removed"] is not None
    for name in (probes["heatmap"], CURVES_FILE):
        assert (out / name).stat().st_size > 0
    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    assert {s["stage"].split(" ")[0] for s in log["steps"]} == {"stage1", "stage2"}
    assert [e["val_accuracy"] is not None for e in log["epochs"]] == [True] * len(log["epochs"])
    selected = ckpt.read_pointer(out, ckpt.SELECTED_POINTER)
    assert (selected / ckpt.ADAPTER_WEIGHTS).is_file() and (selected / ckpt.LATENT_WEIGHTS).is_file()


@pytest.mark.slow
def test_the_check_rejects_a_constant_predictor(small_demo, monkeypatch, tmp_path):
    out, _ = small_demo
    run = load_trained(out)
    examples = prepare_data(run.config)[1]
    real_predict = probes_module.predict

    def always_b(*args, **kwargs):
        return [dict(r, prediction="B", correct=r["answer"] == "B") for r in real_predict(*args, **kwargs)]

    monkeypatch.setattr(probes_module, "predict", always_b)
    metrics = evaluate_model(run.model, run.handle, run.encoder, examples, output_dir=tmp_path, verbose=False)
    assert {r["prediction"] for r in metrics["predictions"]} == {"B"}
    with pytest.raises(AssertionError):
        check_demo_learned(metrics)
    assert not learning_verdict(metrics).learned


@pytest.mark.slow
def test_livr_eval_reproduces_the_demo_accuracy(small_demo, tmp_path):
    out, _ = small_demo
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]["average"]
    assert eval_main(["--checkpoint", str(out), "--output-dir", str(tmp_path / "eval"), "--no-probes"]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["accuracy"]["average"] == pytest.approx(accuracy)


def fabricated_metrics(predictions, answers, forced=None):
    records = [{"task": "counting", "answer": a, "prediction": p, "correct": a == p} for a, p in zip(answers, predictions)]
    accuracy = sum(r["correct"] for r in records) / len(records)
    counts = {a: answers.count(a) for a in set(answers)}
    metrics = {"accuracy": {"average": accuracy}, "chance": {"counting": 0.25}, "options": {"counting": 4},
               "majority": {"counting": max(counts.values()) / len(answers)}, "predictions": records,
               "probes": {"bottleneck_forced": None if forced is None else {"average": forced},
                          "latents_removed": {"average": 0.3}, "answer_to_latent_attention": 0.1}}
    return metrics


def test_verdict_rejects_a_constant_answer_that_beats_chance():
    # B is the gold answer 40% of the time: always answering B beats chance (25%) by 15 points.
    answers = list("BBBBACDACD")
    metrics = fabricated_metrics(["B"] * 10, answers, forced=0.4)
    verdict = learning_verdict(metrics)
    assert metrics["accuracy"]["average"] == 0.4 and not verdict.learned
    assert "DID NOT LEARN" in verdict.text and "only 1 distinct" in verdict.text
    with pytest.raises(AssertionError):
        check_demo_learned(metrics)


def test_verdict_accepts_a_model_that_learned_and_reports_the_signature():
    answers = list("ABCDABCDAB")
    predictions = list("ABCDABCDAA")
    learned = learning_verdict(fabricated_metrics(predictions, answers, forced=0.8))
    assert learned.learned and learned.signature and "drop of 60.0 points" in learned.text
    check_demo_learned(fabricated_metrics(predictions, answers, forced=0.8))
    weak = learning_verdict(fabricated_metrics(predictions, answers, forced=0.45))
    assert weak.learned and weak.signature is False and "NOT shown" in weak.text
    with pytest.raises(AssertionError, match="bottleneck-forced"):
        check_demo_learned(fabricated_metrics(predictions, answers, forced=0.45))


def test_demo_exits_non_zero_when_the_model_did_not_learn(monkeypatch, tmp_path):
    from livr_model.app import cli

    for learned, code in ((False, 1), (True, 0)):
        monkeypatch.setattr(cli, "run_demo", lambda cfg, size, learned=learned: {"verdict": {"learned": learned}})
        assert cli.train_main(["--demo", "--demo-size", "small", "--output-dir", str(tmp_path)]) == code
