"""The refusal of a ``.pt`` file that holds pickled objects is one plain line naming what it
refused: not torch's preamble, which carries terminal escape codes and explains how to load the
file anyway (the opposite of what a planted file calls for)."""
import os

import pytest
import torch

from livr_model.app.files import torch_load


class SystemCall:
    """torch blocks the module outright (its message: 'unsupported GLOBAL posix.system ... blocked')."""

    def __reduce__(self):
        return (os.system, ("echo planted",))


class PrintCall:
    """torch refuses one global (its message: 'Unsupported global: GLOBAL print ...')."""

    def __reduce__(self):
        return (print, ("planted",))


@pytest.mark.parametrize("payload, named", [(SystemCall, "system"), (PrintCall, "GLOBAL print")])
def test_refusal_names_the_global_and_nothing_else_of_torch(tmp_path, payload, named):
    planted = tmp_path / "training_state.pt"
    torch.save({"optimizer": payload()}, planted)
    with pytest.raises(ValueError) as caught:
        torch_load(planted)
    message = str(caught.value)
    assert message.startswith(f"refusing to load {str(planted)!r}: it holds pickled objects"), message
    assert "GLOBAL" in message and named in message, message
    assert "\n" not in message and "\x1b" not in message, message
    assert "weights_only" not in message and "two options" not in message, message


def test_plain_tensors_still_load(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "moments": [torch.ones(2)]}, path)
    loaded = torch_load(path)
    assert loaded["step"] == 3 and torch.equal(loaded["moments"][0], torch.ones(2))
