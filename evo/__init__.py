"""evo: evolutionary model merging and continual adaptation of language models on Ray.

Python API (the CLI is a thin shell over it)::

    import evo
    cfg = evo.load_config("experiment.yaml")         # validated; a zoo's models and sets filled in
    result = evo.run("experiment.yaml", "runs/r1")   # or an ExperimentConfig / dict
    evo.resume("runs/r1")
    release = evo.export("runs/r1")                   # runs/r1/releases/v0001
    page = evo.report("runs/r1")                      # runs/r1/report/index.html
"""

__version__ = "0.1.0"


def load_config(config, **kw):
    from evo.loop.experiment import load_config as _load

    return _load(config, **kw)


def run(config, run_dir, **kw):
    from evo.loop.driver import run as _run

    return _run(config, run_dir, **kw)


def resume(run_dir, **kw):
    from evo.loop.driver import resume as _resume

    return _resume(run_dir, **kw)


def export(run_dir, out=None, **kw):
    from evo.artifacts.release import export as _export

    return _export(run_dir, out, **kw)


def report(run_dir, out=None):
    from evo.artifacts.report import report as _report

    return _report(run_dir, out)
