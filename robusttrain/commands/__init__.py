"""The command-line layer: parses arguments and calls the layers below; nothing imports it.

* :mod:`robusttrain.commands.main` — ``robusttrain``: dispatches to the two below or to the
  LightningCLI (``fit``, ``validate``, ``test``, ``predict``).
* :mod:`robusttrain.commands.robustness` — ``robusttrain robustness``.
* :mod:`robusttrain.commands.compare` — ``robusttrain compare``.
* :mod:`robusttrain.commands.errors` — which errors end a command in one line (exit code 2)
  rather than a traceback.
"""
