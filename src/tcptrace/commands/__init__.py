"""One module per command: ``tcptrace NAME`` runs ``run()`` of ``commands/NAME.py``.

Besides the commands, what they share: ``options.py`` (what the shared options mean),
``sources.py`` (where events come from: a live session on the kernel, or a recording) and
``session.py`` (the loop every command runs).
"""
