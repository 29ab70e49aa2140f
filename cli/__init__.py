"""The ``backbones`` command: the front door to :mod:`models`, :mod:`service`, :mod:`embed` and
:mod:`finetune`. Nothing imports this package; ``backbones`` is :func:`cli.main.main`."""
