"""One function per verb: load -> transform -> evaluate -> save, used by both the CLI (`cli.py`) and `compress run`.

Layers, each importing only those below it: `compress` (the library) < `exporters`, `evals` < `flows` < `cli.py`.
"""
