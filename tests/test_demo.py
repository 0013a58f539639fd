"""The offline demo learns: accuracy above the majority-class rate, several distinct answers, the
forced-bottleneck signature; and the same checks reject a constant predictor."""
import json
from types import SimpleNamespace

import pytest
from accelerate import Accelerator

from livr_model.app import callbacks as callbacks_module
from livr_model.app import probes as probes_module
from livr_model.app import checkpoints as ckpt
from livr_model.app.cli import eval_main, train_main
from livr_model.app.data import prepare_data
from livr_model.app.demo import CURVES_FILE, TRAINING_LOG_FILE
from livr_model.app.models import load_trained
from livr_model.app.probes import (BOTTLENECK_STAGE_KEY, SIGNATURE_MARGIN, bottleneck_stage_record, evaluate_model,
                                   learning_verdict)

# The small demo's margins: it must beat always-the-most-common-answer by this much.
MAJORITY_MARGIN = 0.15
MIN_DISTINCT = 3


def check_demo_learned(metrics: dict) -> None:
    """Raise AssertionError unless ``metrics`` show a model that learned, with the mechanism signature
    (answers that see only the latents well above chance at the end of the bottleneck stage)."""
    accuracy = metrics["accuracy"]["average"]
    majority = max(metrics["majority"].values())
    chance = max(metrics["chance"].values())
    distinct = {r["prediction"] for r in metrics["predictions"] if r["prediction"] is not None}
    assert accuracy >= majority + MAJORITY_MARGIN, f"accuracy {accuracy:.3f} is not {MAJORITY_MARGIN} above the majority rate {majority:.3f}"
    assert len(distinct) >= MIN_DISTINCT, f"only {sorted(distinct)} predicted"
    assert metrics.get(BOTTLENECK_STAGE_KEY), "the metrics hold no accuracy under the bottleneck at the end of stage 1"
    bottleneck = metrics[BOTTLENECK_STAGE_KEY]["accuracy"]
    assert bottleneck >= chance + SIGNATURE_MARGIN, (f"accuracy under the bottleneck at the end of stage 1 {bottleneck:.3f} is "
                                                     f"not {SIGNATURE_MARGIN} above chance {chance:.3f}")
    verdict = learning_verdict(metrics)
    assert verdict.learned and verdict.signature


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
    # The bottleneck stage is also scored under its own rule; the standard stage is not scored twice.
    assert [e["stage_rule_accuracy"] is not None for e in log["epochs"]] == [e["rule"] == "bottleneck" for e in log["epochs"]]
    assert metrics[BOTTLENECK_STAGE_KEY]["global_step"] == max(e["global_step"] for e in log["epochs"] if e["rule"] == "bottleneck")
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
    # The demo's own stage-1 record: only the constant answers may fail the check.
    metrics[BOTTLENECK_STAGE_KEY] = json.loads((out / "metrics.json").read_text())[BOTTLENECK_STAGE_KEY]
    assert {r["prediction"] for r in metrics["predictions"]} == {"B"}
    with pytest.raises(AssertionError, match="majority rate"):
        check_demo_learned(metrics)
    assert not learning_verdict(metrics).learned


@pytest.mark.slow
def test_a_model_that_ignores_the_latents_shows_no_signature(small_demo, monkeypatch):
    out, _ = small_demo
    metrics = json.loads((out / "metrics.json").read_text())
    run = load_trained(out)
    real_predict = callbacks_module.predict

    def without_latents(*args, **kwargs):
        return real_predict(*args, **dict(kwargs, drop_latents=True))

    # Validate's scoring under the bottleneck, on a model whose prompts lose their latents: the
    # answers then see neither the image nor the latents.
    monkeypatch.setattr(callbacks_module, "predict", without_latents)
    context = SimpleNamespace(cfg=run.config, accelerator=Accelerator(cpu=True), model=run.model, handle=run.handle,
                              encoder=run.encoder, val_examples=prepare_data(run.config)[1], val_per_task=None)
    blind = callbacks_module.validation_accuracy(context, rule="bottleneck")
    history = [{"epoch": 1, "global_step": 100, "rule": "bottleneck", "stage_rule_accuracy": blind}]
    metrics[BOTTLENECK_STAGE_KEY] = bottleneck_stage_record(history)
    assert learning_verdict(metrics).signature is False
    with pytest.raises(AssertionError, match="end of stage 1"):
        check_demo_learned(metrics)


@pytest.mark.slow
def test_livr_eval_reproduces_the_demo_accuracy(small_demo, tmp_path):
    out, _ = small_demo
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]["average"]
    assert eval_main(["--checkpoint", str(out), "--output-dir", str(tmp_path / "eval"), "--no-probes"]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["accuracy"]["average"] == pytest.approx(accuracy)


def fabricated_metrics(predictions, answers, forced=None, stage1=None):
    records = [{"task": "counting", "answer": a, "prediction": p, "correct": a == p} for a, p in zip(answers, predictions)]
    accuracy = sum(r["correct"] for r in records) / len(records)
    counts = {a: answers.count(a) for a in set(answers)}
    metrics = {"accuracy": {"average": accuracy}, "chance": {"counting": 0.25}, "options": {"counting": 4},
               "majority": {"counting": max(counts.values()) / len(answers)}, "predictions": records,
               "probes": {"bottleneck_forced": None if forced is None else {"average": forced},
                          "latents_removed": {"average": 0.3}, "answer_to_latent_attention": 0.1}}
    if stage1 is not None:
        metrics[BOTTLENECK_STAGE_KEY] = {"accuracy": stage1, "global_step": 200, "epoch": 1}
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


def test_majority_rate_is_each_tasks_most_common_answer_share():
    examples = [SimpleNamespace(task="counting", answer=a) for a in "BBBACDB"] + \
        [SimpleNamespace(task="jigsaw", answer=a) for a in "ABBA"]
    assert probes_module.majority_rate(examples) == {"counting": pytest.approx(4 / 7), "jigsaw": 0.5}


def test_verdict_rejects_varied_answers_no_better_than_always_the_most_common():
    # B is gold 60% of the time; four different answers, 60% right: chance is beaten, the majority rate is not.
    answers = list("BBBBBBACDA")
    predictions = list("BBBBBBDACB")
    metrics = fabricated_metrics(predictions, answers, forced=0.8)
    assert metrics["accuracy"]["average"] == 0.6 and metrics["majority"]["counting"] == 0.6
    verdict = learning_verdict(metrics)
    assert not verdict.learned and "not 10 points above 60.0%" in verdict.text


def test_verdict_counts_unreadable_replies_as_no_distinct_answer():
    # Only A and B are ever given (plus one reply with no letter): two distinct answers, not three.
    answers = list("ABCDABCDAB")
    predictions = list("ABBAABBAA") + [None]
    metrics = fabricated_metrics(predictions, answers, forced=0.8)
    verdict = learning_verdict(metrics)
    assert not verdict.learned and "only 2 distinct" in verdict.text


def test_verdict_accepts_a_model_that_learned_and_reports_the_signature():
    answers = list("ABCDABCDAB")
    predictions = list("ABCDABCDAA")
    learned = learning_verdict(fabricated_metrics(predictions, answers, forced=0.8))
    assert learned.learned and learned.signature and "drop of 60.0 points" in learned.text
    weak = learning_verdict(fabricated_metrics(predictions, answers, forced=0.45))
    assert weak.learned and weak.signature is False and "NOT shown" in weak.text


def test_the_signature_is_judged_at_the_end_of_the_bottleneck_stage():
    answers = list("ABCDABCDAB")
    predictions = list("ABCDABCDAA")
    # Learned through the latents in stage 1, the route not kept after stage 2: shown, the loss reported.
    metrics = fabricated_metrics(predictions, answers, forced=0.2, stage1=0.95)
    verdict = learning_verdict(metrics)
    assert verdict.signature and "signature shown" in verdict.text and "step 200" in verdict.text
    assert "has NOT kept" in verdict.text and "forced at test 20.0%" in verdict.text
    check_demo_learned(metrics)
    kept = learning_verdict(fabricated_metrics(predictions, answers, forced=0.9, stage1=0.95))
    assert kept.signature and "keeps" in kept.text
    # Stage 1 at chance is no signature, whatever the forced probe after stage 2 says.
    metrics = fabricated_metrics(predictions, answers, forced=0.9, stage1=0.3)
    assert learning_verdict(metrics).signature is False and "NOT shown" in learning_verdict(metrics).text
    with pytest.raises(AssertionError, match="end of stage 1"):
        check_demo_learned(metrics)


def test_bottleneck_stage_record_takes_the_last_bottleneck_epoch():
    history = [{"epoch": 0, "global_step": 100, "rule": "bottleneck", "stage_rule_accuracy": 0.7},
               {"epoch": 1, "global_step": 200, "rule": "bottleneck", "stage_rule_accuracy": 0.9},
               {"epoch": 2, "global_step": 300, "rule": "standard", "stage_rule_accuracy": None}]
    assert bottleneck_stage_record(history) == {"accuracy": 0.9, "global_step": 200, "epoch": 1}
    assert bottleneck_stage_record(history[2:]) is None
    # Records written before the bottleneck stage was scored under its rule hold no such accuracy.
    assert bottleneck_stage_record([{"epoch": 0, "global_step": 100, "stage": "stage1", "val_accuracy": 0.5}]) is None


@pytest.mark.parametrize("constant", [True, False], ids=["always-B", "learned"])
def test_demo_run_judges_its_own_evaluation(monkeypatch, tmp_path, constant):
    """run_demo's wiring, training and evaluation faked: the verdict saved in metrics.json and the
    exit code come from the evaluated predictions and the bottleneck stage's record, so a demo that
    answers B to everything exits 1 whatever else went right."""
    from pathlib import Path

    from livr_model.app import demo as demo_module

    answers = list("ABCDABCDAB")
    predictions = ["B"] * len(answers) if constant else list("ABCDABCDAA")
    history = [{"epoch": 0, "global_step": 50, "stage": "stage1", "rule": "bottleneck", "stage_rule_accuracy": 0.9},
               {"epoch": 1, "global_step": 100, "stage": "stage2", "rule": "standard", "stage_rule_accuracy": None}]

    def evaluate(*args, output_dir=None, extra=None, **kwargs):
        metrics = dict(fabricated_metrics(predictions, answers, forced=0.3), **(extra or {}))
        (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(demo_module, "build_demo_base", lambda base_dir, *args, **kwargs: base_dir.mkdir(parents=True))
    monkeypatch.setattr(demo_module, "train", lambda cfg, step_callback=None: SimpleNamespace(
        val_examples=[], state=SimpleNamespace(history=history)))
    monkeypatch.setattr(demo_module, "load_trained", lambda out: SimpleNamespace(
        model=None, handle=None, encoder=None, checkpoint_dir=Path(out) / ckpt.CHECKPOINTS_DIR / "step-00000100"))
    monkeypatch.setattr(demo_module, "evaluate_model", evaluate)
    out = tmp_path / "demo"
    code = train_main(["--demo", "--demo-size", "small", "--output-dir", str(out), "--no-progress"])
    saved = json.loads((out / "metrics.json").read_text())
    assert code == (1 if constant else 0)
    assert saved["verdict"]["learned"] is not constant
    assert ("DID NOT LEARN" in saved["verdict"]["text"]) is constant
    # The signature is judged on the bottleneck stage's own record, not on the forced probe (30%).
    assert saved[BOTTLENECK_STAGE_KEY] == {"accuracy": 0.9, "global_step": 50, "epoch": 0}
    assert saved["verdict"]["signature"] is True


def test_demo_exits_non_zero_when_the_model_did_not_learn(monkeypatch, tmp_path):
    from livr_model.app import cli

    for learned, code in ((False, 1), (True, 0)):
        monkeypatch.setattr(cli, "run_demo", lambda cfg, size, learned=learned: {"verdict": {"learned": learned}})
        assert cli.train_main(["--demo", "--demo-size", "small", "--output-dir", str(tmp_path)]) == code
