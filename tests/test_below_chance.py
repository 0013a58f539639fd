"""Accuracy under chance is reported as systematic wrong answers, naming the preferred answer, in the
printed table and the verdict; at chance (guessing or one constant answer) nothing is said."""
from livr_model.app.probes import learning_verdict
from livr_model.app.scoring import BELOW_CHANCE_MARGIN, below_chance_note, metrics_table, most_common_prediction

LETTERS = "ABCD"
ITEMS_PER_ANSWER = 25


def metrics_of(predict):
    """Balanced 4-way metrics (25 items per gold letter); ``predict(gold, i)`` gives the prediction."""
    records = []
    for gold in LETTERS:
        for i in range(ITEMS_PER_ANSWER):
            prediction = predict(gold, i)
            records.append({"task": "counting", "answer": gold, "prediction": prediction, "correct": prediction == gold})
    accuracy = sum(r["correct"] for r in records) / len(records)
    return {"accuracy": {"average": accuracy, "per_task": {"counting": {"accuracy": accuracy}}}, "chance": {"counting": 0.25},
            "majority": {"counting": 0.25}, "options": {"counting": 4}, "predictions": records, "num_examples": len(records),
            "method": "generate", "rule": "standard"}


def studys_prompt_tuning(gold, i):
    # What the study's prompt-tuning cell answered: "D" for every A, B and C item, and "B" for most D items.
    return "D" if gold != "D" or i < 3 else "B"


def test_the_studys_pattern_is_called_below_chance_with_its_preferred_answer():
    metrics = metrics_of(studys_prompt_tuning)
    assert metrics["accuracy"]["average"] == 0.03
    majority = max(metrics["majority"].values())
    distinct = {r["prediction"] for r in metrics["predictions"]}
    assert metrics["accuracy"]["average"] <= majority - BELOW_CHANCE_MARGIN and len(distinct) == 2
    assert most_common_prediction(metrics["predictions"]) == ("D", 0.78)
    note = below_chance_note(metrics)
    assert note.startswith("BELOW CHANCE: accuracy 3.0% is 22.0 points under chance (25.0%)")
    assert "'D', is given for 78% of the items but is the gold answer of 25%" in note
    verdict = learning_verdict(metrics)
    assert verdict.below_chance and not verdict.learned and note in verdict.text
    assert note in metrics_table(metrics)


def test_chance_level_answers_are_not_below_chance():
    constant = metrics_of(lambda gold, i: "D")
    guessing = metrics_of(lambda gold, i: LETTERS[i % 4])
    for metrics in (constant, guessing):
        assert metrics["accuracy"]["average"] == 0.25
        assert below_chance_note(metrics) is None
        verdict = learning_verdict(metrics)
        assert not verdict.below_chance and "BELOW CHANCE" not in verdict.text
        assert "BELOW CHANCE" not in metrics_table(metrics)


def test_the_margin_decides():
    # 16% is 9 points under chance: within the margin, not flagged; 15% is flagged.
    def wrong(gold):
        return "A" if gold != "A" else "B"
    nine_under = metrics_of(lambda gold, i: gold if i < 4 else wrong(gold))
    ten_under = metrics_of(lambda gold, i: gold if i < 4 and (gold, i) != ("D", 3) else wrong(gold))
    assert nine_under["accuracy"]["average"] == 0.16 and below_chance_note(nine_under) is None
    assert ten_under["accuracy"]["average"] == 0.15 and below_chance_note(ten_under) is not None


def test_open_ended_tasks_have_no_chance_to_be_under():
    metrics = metrics_of(lambda gold, i: "A")
    metrics["chance"] = {"counting_open": None}
    metrics["accuracy"]["average"] = 0.0
    assert below_chance_note(metrics) is None
