"""One module per command: ``tcptrace NAME`` runs ``commands/NAME.py``.

Besides the commands: ``sources.py`` (where events come from: a live session on the
kernel, or a recording) and ``session.py`` (the loop every command runs).
"""
