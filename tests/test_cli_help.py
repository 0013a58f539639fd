"""The tools' --help says what each flag does for every registered mode, not for the modes there
were when the help was written."""
from livr_model.app.cli import build_train_parser
from livr_model.app.config import TrainConfig, stage_plan
from livr_model.modes import MODES

SFT_EPOCHS = 7


def flag_help(parser, flag: str) -> str:
    return next(action.help for action in parser._actions if flag in action.option_strings)


def test_sft_epochs_help_names_every_mode_it_sets():
    """--sft-epochs sets the epochs of every mode that runs one stage (stage_plan reads it)."""
    uses_it = [name for name in MODES
               if [s.epochs for s in stage_plan(TrainConfig(mode=name, sft_epochs=SFT_EPOCHS))] == [SFT_EPOCHS]]
    assert "prompt-tuning" in uses_it
    text = flag_help(build_train_parser(), "--sft-epochs")
    assert [name for name in MODES if name in text.replace("(", " ").replace(")", " ").replace(",", " ").split()] == uses_it, text
