"""The livr application on top of the library: run configuration, data sources, the training loop
with its callbacks, run state, scoring and probes, figures, the offline demo and the command lines.

Nothing in ``livr_model`` proper imports this package; import its modules directly
(``livr_model.app.train``, ``livr_model.app.cli``, ...).
"""
